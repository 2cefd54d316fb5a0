"""PaDiM (Defard et al., ICPR workshops 2021): per-position Gaussians of backbone features,
Mahalanobis distance maps. Faithful to anomalib 2.7.0's ``PadimModel`` (``padim_reference_v1.npz``)."""

from kdad.methods.base import MethodSpec
from kdad.methods.padim.fit import fit_padim
from kdad.methods.padim.model import PadimModel, build_model

METHOD = MethodSpec(
    name="padim",
    summary="PaDiM: multivariate Gaussian per feature-map position (fit, no training), "
            "Mahalanobis distance map, blur sigma 4, score = max",
    build_model=build_model,
    fit=fit_padim,
)

__all__ = ["METHOD", "PadimModel", "build_model", "fit_padim"]
