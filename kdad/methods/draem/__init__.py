"""DRAEM (Zavrtanik et al., ICCV 2021): a reconstructive subnetwork restores images with simulated
anomalies (Perlin masks, blended textures), a discriminative subnetwork segments the anomaly from the
input and its reconstruction; map = the segmentation's anomaly probability, score = max of its 21x21
mean. No ImageNet backbone. Faithful to the official code (github VitjanZ/DRAEM @ 2dbf673;
``draem_reference_v1.npz``)."""

from kdad.methods.base import MethodSpec
from kdad.methods.draem.loss import draem_loss, focal_loss, l2_loss, loss_terms, ssim, ssim_loss, ssim_range
from kdad.methods.draem.model import DRAEMModel, anomaly_probability, build_model, image_score, rgb_to_bgr
from kdad.methods.draem.networks import (
    DiscriminativeSubNetwork,
    DRAEMNetworks,
    ReconstructiveSubNetwork,
    official_to_paddle_key,
    state_from_official,
)
from kdad.methods.draem.train import TRAINING

METHOD = MethodSpec(
    name="draem",
    summary="DRAEM: reconstructive + discriminative U-Nets trained on simulated anomalies (Perlin masks, "
            "blended textures) with MSE + SSIM + focal loss; map = softmax anomaly channel, score = max "
            "of its 21x21 mean",
    build_model=build_model,
    training=TRAINING,
    maps_blurred_in_graph=True,  # the official map is not blurred: the runtime must not add a blur
    uses_backbone=False,
)

__all__ = ["DRAEMModel", "DRAEMNetworks", "DiscriminativeSubNetwork", "METHOD", "ReconstructiveSubNetwork",
           "TRAINING", "anomaly_probability", "build_model", "draem_loss", "focal_loss", "image_score",
           "l2_loss", "loss_terms", "official_to_paddle_key", "rgb_to_bgr", "ssim", "ssim_loss", "ssim_range",
           "state_from_official"]
