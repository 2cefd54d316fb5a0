"""The exportable CFlow-AD network (Gudovskiy et al., WACV 2022): frozen encoder, one conditional flow per
encoder tap, anomaly map from the per-position log-likelihoods.

``forward(x)`` takes RGB images in [0, 1] (``[N, 3, S, S]``) and returns ``(scores [N], maps [N, S, S])``.
Steps, faithful to the official code (github gudovskiy/cflow-ad @ b2ebf9e, ``train.py``:
``test_meta_epoch`` and the score-map lines of ``train()``; ``cflow_reference_v1.npz`` checks each):

1. encoder taps (paper: Wide-ResNet-50-2 layer2, layer3, layer4, ``pool_layers=3``; ``self.backbone``,
   frozen, with the official reflect padding, :mod:`~kdad.methods.cflow.encoder`);
2. per tap, every fiber (image, row, column) through its flow (``self.decoders``), conditioned on the
   position's ``positionalencoding2d(128, H, W)`` (buffers ``pos_enc_{l}``, ``[H*W, 128]``, computed at
   build time); ``log_prob = get_logp(C, z, logdet) / C`` (:meth:`CFlowModel.log_likelihoods`);
3. per tap ``prob = exp(log_prob - max)``, resampled bilinear (align_corners=True) to ``S`` and summed
   over the taps (:meth:`CFlowModel.probability_sum`); the anomaly map is a constant minus that sum and the
   image score the map's maximum.

The one departure, needed for a per-image exportable model: the official ``max`` in step 3 is taken over
the **whole test set** (per tap, then once more over the summed map), so an image's map depends on the
other test images. Here the per-tap maxima are **fixed reference values** (buffer ``log_prob_max``, the
largest log-likelihood per tap over the training images: :func:`set_reference_maxima`, called after
training) and the map is ``L - sum`` (``L`` = number of taps, the largest possible sum when no
probability exceeds 1). For a fixed set of maxima this map equals the official ``super_mask`` plus a
constant (same ordering of pixels and images, same AUROC); what differs is only which maxima weight the
taps (``exp(-max)`` per tap: training set instead of test set). :meth:`CFlowModel.set_level_maps`
computes the official set-level behaviour (both maxima over the given batch) for the golden test.

The resampling is two products with fixed matrices (:class:`~kdad.layers.MatrixResize`), the condition
is broadcast by an addition (no shape-dependent ops), so the exported graph has no interpolation op,
runs under oneDNN and converts with paddle2onnx; ``forward`` has no numpy or data-dependent Python
control flow (``to_static(full_graph=True)``).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn

from kdad.backbones.base import Backbone
from kdad.layers import MatrixResize, image_max
from kdad.methods.base import AnomalyModel
from kdad.methods.cflow.flows import CLAMP_ALPHA, CONDITION_VEC, COUPLING_BLOCKS, CFlowDecoders
from kdad.methods.cflow.loss import log_likelihood, positionalencoding2d

#: the official ``pool_layers=3``: WRN50-2's layer2, layer3, layer4 (the same stage outputs of any backbone)
DEFAULT_LAYERS: Tuple[str, ...] = ("layer2", "layer3", "layer4")
#: the official fiber batch ``N``
FIBER_BATCH = 256

Images = Union[np.ndarray, paddle.Tensor]


class CFlowModel(AnomalyModel):
    """CFlow-AD scorer: ``backbone`` (encoder, frozen) and ``decoders`` (one conditional flow per tap)."""

    method = "cflow"

    def __init__(self, backbone: Backbone, image_size: int, layers: Optional[Sequence[str]] = None,
                 coupling_blocks: int = COUPLING_BLOCKS, clamp: float = CLAMP_ALPHA,
                 condition_vec: int = CONDITION_VEC, fiber_batch: int = FIBER_BATCH,
                 permutation_seed: Optional[int] = 0) -> None:
        """``permutation_seed``: seed of the numpy generator drawing the flows' soft permutations
        (``None``: left zero, for weights loaded right after)."""
        super().__init__()
        self.backbone = backbone.freeze()
        self.backbone_name = backbone.name
        self.layers: List[str] = list(layers if layers is not None else DEFAULT_LAYERS)
        missing = [tap for tap in self.layers if tap not in backbone.taps]
        if not self.layers or missing:
            raise ValueError(f"CFlow-AD needs encoder taps that the backbone computes, got {self.layers} "
                             f"(the backbone has {backbone.taps})")
        self.image_size = int(image_size)
        self.fiber_batch = int(fiber_batch)
        if self.fiber_batch < 1:
            raise ValueError(f"fiber_batch must be >= 1, got {fiber_batch}")
        self.condition_vec = int(condition_vec)
        self.grid = self._probe_sizes()
        self.channels = [backbone.channels(tap) for tap in self.layers]
        rng = np.random.default_rng(permutation_seed) if permutation_seed is not None else None
        self.decoders = CFlowDecoders(self.channels, self.condition_vec, coupling_blocks, clamp, rng)
        for index, (h, w) in enumerate(self.grid):  # fiber order: row-major positions
            encoding = positionalencoding2d(self.condition_vec, h, w).reshape(self.condition_vec, h * w).T
            self.register_buffer(f"pos_enc_{index}", paddle.to_tensor(np.ascontiguousarray(encoding)),
                                 persistable=True)
        self.register_buffer("log_prob_max", paddle.zeros([len(self.layers)], dtype="float32"),
                             persistable=True)
        #: how many images the reference maxima were taken over (0: not set yet)
        self.register_buffer("reference_images", paddle.zeros([1], dtype="float32"), persistable=True)
        size = (self.image_size, self.image_size)
        self.resizers = nn.LayerList([MatrixResize(grid, size, align_corners=True) for grid in self.grid])

    def _probe_sizes(self) -> List[Tuple[int, int]]:
        """``[(h, w)]`` of the taps at the model's input size (one forward of a 1-image zero batch)."""
        with paddle.no_grad():
            feats = self.backbone(paddle.zeros([1, 3, self.image_size, self.image_size], dtype="float32"))
        return [(int(feats[tap].shape[2]), int(feats[tap].shape[3])) for tap in self.layers]

    def train(self, mode: bool = True) -> CFlowModel:  # the frozen encoder never leaves eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def has_reference_maxima(self) -> bool:
        return float(self.reference_images.numpy()[0]) > 0

    def position_encoding(self, index: int) -> paddle.Tensor:
        """Tap ``index``'s condition of every position, ``[H*W, P]`` (row-major)."""
        return getattr(self, f"pos_enc_{index}")

    def encoder_features(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        """The encoder's taps of images ``x`` in [0, 1], in :attr:`layers` order."""
        feats = self.backbone(x)
        return [feats[tap] for tap in self.layers]

    def flow_outputs(self, index: int, features: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Tap ``index``'s features ``[N, C, H, W]`` through its flow: ``(z [N, H*W, C], logdet [N, H*W])``
        (every fiber with its position's condition)."""
        x = features.flatten(2).transpose([0, 2, 1])  # [N, H*W, C]: (image, row, column)
        condition = paddle.zeros_like(x[:, :, :1]) + self.position_encoding(index).unsqueeze(0)
        return self.decoders(index, x, condition)

    def log_likelihoods(self, features: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
        """Per tap the log-likelihood per dimension of every position, ``[N, h_l, w_l]``."""
        out = []
        for index, (feature, (h, w)) in enumerate(zip(features, self.grid)):
            z, log_jac_det = self.flow_outputs(index, feature)
            out.append(log_likelihood(z, log_jac_det).reshape([-1, h, w]))
        return out

    def probabilities(self, log_probs: Sequence[paddle.Tensor],
                      maxima: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
        """The official ``test_prob`` per tap: ``exp(log_prob - max)`` at the tap's resolution."""
        return [paddle.exp(lp - m) for lp, m in zip(log_probs, maxima)]

    def probability_sum(self, log_probs: Sequence[paddle.Tensor],
                        maxima: Sequence[paddle.Tensor]) -> paddle.Tensor:
        """The official ``score_map``: the probabilities resampled (bilinear, align_corners=True) to ``S``
        and summed over the taps, ``[N, S, S]`` (in the dtype of ``log_probs``)."""
        total = None
        for resize, prob in zip(self.resizers, self.probabilities(log_probs, maxima)):
            upsampled = resize(prob)
            total = upsampled if total is None else total + upsampled
        return total

    def reference_maxima(self) -> List[paddle.Tensor]:
        return [self.log_prob_max[index] for index in range(len(self.layers))]

    def anomaly_maps(self, log_probs: Sequence[paddle.Tensor]) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``(scores [N], maps [N, S, S])`` with the fixed reference maxima: map = ``L - score_map``."""
        maps = float(len(self.layers)) - self.probability_sum(log_probs, self.reference_maxima())
        return image_max(maps), maps

    def set_level_maps(self, log_probs: Sequence[paddle.Tensor]) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """The official test-set behaviour on the images of ``log_probs`` (the "test set"): per-tap maxima
        over them, ``super_mask = score_map.max() - score_map``; returns ``(score_label [N], super_mask)``.
        The original computes this in float64: pass float64 log-likelihoods for its precision."""
        maxima = [paddle.max(lp) for lp in log_probs]
        score_map = self.probability_sum(log_probs, maxima)
        super_mask = paddle.max(score_map) - score_map
        return image_max(super_mask), super_mask

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        size = x.shape[-1]
        if isinstance(size, int) and size > 0 and size != self.image_size:
            raise ValueError(f"this CFlow-AD model was built for {self.image_size} px; got input of "
                             f"{size} px")
        return self.anomaly_maps(self.log_likelihoods(self.encoder_features(x)))


def set_reference_maxima(model: CFlowModel, images: Images, batch_size: int = 16) -> np.ndarray:
    """Set the model's fixed normaliser: per tap the largest log-likelihood over ``images`` (normal
    training images ``[N, 3, S, S]`` in [0, 1], numpy or Paddle), computed in eval mode without gradients.
    Call it once after training (before calibration and export). Returns the maxima."""
    count = int(images.shape[0])
    if count < 1:
        raise ValueError("set_reference_maxima needs at least one image")
    was_training = model.training
    model.eval()
    maxima = np.full(len(model.layers), -np.inf)
    with paddle.no_grad():
        for start in range(0, count, int(batch_size)):
            batch = images[start:start + int(batch_size)]
            x = batch if isinstance(batch, paddle.Tensor) else paddle.to_tensor(np.asarray(batch, np.float32))
            for index, lp in enumerate(model.log_likelihoods(model.encoder_features(x))):
                maxima[index] = max(maxima[index], float(paddle.max(lp)))
    if not np.all(np.isfinite(maxima)):
        raise ValueError(f"the log-likelihoods of the reference images are not finite: maxima {maxima}")
    model.log_prob_max.set_value(maxima.astype(np.float32))
    model.reference_images.set_value(np.array([count], dtype=np.float32))
    model.train(was_training)
    return maxima


def flows_state_from_official(state: Mapping[str, Any]) -> dict:
    """The official ``decoders.{l}.*`` state (FrEIA keys, torch layout; other keys ignored) ->
    :class:`~kdad.methods.cflow.flows.CFlowDecoders` keys (``{l}.module_list.{k}.*``): the same names,
    ``Linear`` weights (``subnet.{0,2}.weight``) transposed to Paddle's ``[in, out]``."""
    out = {}
    for key, value in state.items():
        if not key.startswith("decoders."):
            continue
        array = np.asarray(value, dtype=np.float32)
        if ".subnet." in key and key.endswith(".weight"):
            array = np.ascontiguousarray(array.T)
        out[key[len("decoders."):]] = array
    return out


def build_model(config: Mapping[str, Any]) -> CFlowModel:
    """The untrained :class:`CFlowModel` of ``config`` (keys ``backbone``, ``backbone_pretrained``,
    ``backbone_weights``, ``layers`` (empty: layer2-4), ``mvtec_img_size``, ``fiber_batch``, ``seed``: the
    subnets are drawn after ``paddle.seed(seed)``, the permutations from ``numpy.random.default_rng(seed)``,
    so a config always gives the same network)."""
    from kdad.methods.cflow.encoder import build_encoder

    layers = list(config.get("layers") or DEFAULT_LAYERS)
    backbone = build_encoder(config["backbone"], layers, pretrained=bool(config["backbone_pretrained"]),
                             weights_path=config.get("backbone_weights") or None)
    seed = int(config["seed"])
    paddle.seed(seed)
    return CFlowModel(backbone, image_size=int(config["mvtec_img_size"]), layers=layers,
                      fiber_batch=int(config.get("fiber_batch", FIBER_BATCH)), permutation_seed=seed)
