"""CFlow-AD (Gudovskiy et al., WACV 2022): a frozen encoder and one conditional normalising flow per
encoder tap (8 FrEIA AllInOneBlocks conditioned on a 2-D positional encoding), trained by maximum
likelihood on feature vectors; anomaly map = the per-position likelihoods, normalised, upsampled and
summed over the taps. Faithful to the official code (github gudovskiy/cflow-ad @ b2ebf9e with FrEIA
@ cc5cf5eb, ``cflow_reference_v1.npz``); the one departure (fixed reference maxima instead of test-set
maxima, so that the exported model scores one image at a time) is described in ``model.py``."""

from kdad.methods.base import MethodSpec
from kdad.methods.cflow.encoder import build_encoder, reflect_convs, use_reflect_padding
from kdad.methods.cflow.flows import AllInOneBlock, CFlowDecoders, ConditionalFlow, subnet_fc
from kdad.methods.cflow.loss import GCONST, fibers, get_logp, log_likelihood, nll, positionalencoding2d
from kdad.methods.cflow.model import (
    DEFAULT_LAYERS,
    CFlowModel,
    build_model,
    flows_state_from_official,
    set_reference_maxima,
)
from kdad.methods.cflow.train import TRAINING, CFlowSchedule, fiber_batches

METHOD = MethodSpec(
    name="cflow",
    summary="CFlow-AD: frozen encoder (layer2-4), one conditional normalising flow per tap trained by "
            "maximum likelihood on fibers; map = layers - sum of exp(log-likelihood - reference max), "
            "bilinear, score = max",
    build_model=build_model,
    training=TRAINING,
    maps_blurred_in_graph=True,  # the official map has no blur: the runtime must not add one
)

__all__ = ["DEFAULT_LAYERS", "GCONST", "METHOD", "TRAINING", "AllInOneBlock", "CFlowDecoders", "CFlowModel",
           "CFlowSchedule", "ConditionalFlow", "build_encoder", "build_model", "fiber_batches", "fibers",
           "flows_state_from_official", "get_logp", "log_likelihood", "nll", "positionalencoding2d",
           "reflect_convs", "set_reference_maxima", "subnet_fc", "use_reflect_padding"]
