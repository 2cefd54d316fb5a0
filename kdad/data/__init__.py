"""Data: image/mask reading, dataset listing, the paddle dataset and a synthetic MVTec-style class."""

from kdad.data.datasets import AnomalyDataset, Sample, list_folder, list_mvtec, split_holdout
from kdad.data.io import IMAGE_EXTENSIONS, ImageReadError, preprocess, read_image, read_mask, resize_mask

__all__ = [
    "IMAGE_EXTENSIONS",
    "AnomalyDataset",
    "ImageReadError",
    "Sample",
    "generate_synthetic_class",
    "list_folder",
    "list_mvtec",
    "preprocess",
    "read_image",
    "read_mask",
    "resize_mask",
    "split_holdout",
]


def __getattr__(name: str):
    # imported lazily so that ``python -m kdad.data.synthetic`` does not import the module twice
    if name == "generate_synthetic_class":
        from kdad.data.synthetic import generate_synthetic_class

        return generate_synthetic_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
