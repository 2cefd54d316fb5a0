"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features;
patch score = distance to the nearest bank entry, image score re-weighted as in the paper."""

from kdad.methods.base import MethodSpec
from kdad.methods.patchcore.fit import fit_patchcore
from kdad.methods.patchcore.model import PatchcoreModel, build_model

METHOD = MethodSpec(
    name="patchcore",
    summary="PatchCore: nearest-neighbour distance of backbone patch features to a coreset memory bank",
    build_model=build_model,
    fit=fit_patchcore,
)

__all__ = ["METHOD", "PatchcoreModel", "build_model", "fit_patchcore"]
