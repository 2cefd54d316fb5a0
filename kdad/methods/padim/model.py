"""The exportable PaDiM network (Defard et al., 2021): backbone, Gaussian statistics, distance map.

``forward(x)`` takes RGB images in [0, 1] (``[N, 3, S, S]``, ``S`` = the size the model was built
for) and returns ``(scores [N], maps [N, S, S])``:

1. backbone taps (the first tap sets the grid; later taps are brought to it with **nearest**
   interpolation, as anomalib's ``F.interpolate`` default) -> concatenation along channels;
2. the fixed random channel subset ``feature_index`` (a buffer, saved with the model);
3. per position ``p`` the Mahalanobis distance ``sqrt(max(0, (e - mean_p)^T inv_p (e - mean_p)))``;
4. bilinear (align_corners False) to ``S``, Gaussian blur (``reflect`` padding, anomalib's) and the
   image score = the maximum of the blurred map.

All statistics are persistable buffers, so ``state_dict()`` and ``paddle.jit.save`` carry them, and
``forward`` has no numpy or data-dependent Python control flow (it converts with ``full_graph=True``).
The two resamplings are written without interpolation ops (nearest = ``index_select`` with fixed
indices, bilinear = two products with fixed interpolation matrices), which compute the same values as
``F.interpolate`` but, unlike it, run under oneDNN in Paddle Inference 3.3.1 (interp ops fail there).
Fitting lives in :mod:`kdad.methods.padim.fit`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle

from kdad.backbones.base import Backbone
from kdad.layers import GaussianBlur2D, bilinear_matrix, image_max, nearest_indices
from kdad.methods.base import AnomalyModel, new_buffer

DEFAULT_LAYERS: Tuple[str, ...] = ("layer1", "layer2", "layer3")
#: (distance map [N, h, w], upsampled map [N, S, S], blurred map [N, S, S])
Maps = Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]


class PadimModel(AnomalyModel):
    """PaDiM scorer. Buffers: ``feature_index`` [d] int64, ``mean`` [P, d], ``inv_covariance``
    [P, d, d] (float32), with ``P = grid[0] * grid[1]`` the positions of the first tap's grid
    (row-major, ``p = y * w + x``) at input size ``image_size``."""

    method = "padim"

    def __init__(self, backbone: Backbone, feature_index: Sequence[int], image_size: int,
                 blur_sigma: float = 4.0, layers: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.backbone = backbone.freeze()
        self.backbone_name = backbone.name
        self.layers: List[str] = list(layers if layers is not None else backbone.taps)
        missing = [tap for tap in self.layers if tap not in backbone.taps]
        if missing:
            raise ValueError(f"PaDiM layers {missing} are not taps of the backbone (it has {backbone.taps})")
        self.image_size = int(image_size)
        self.blur_sigma = float(blur_sigma)
        self.total_channels = int(sum(backbone.channels(tap) for tap in self.layers))
        index = np.asarray(feature_index, dtype=np.int64).reshape(-1)
        if index.size == 0:
            raise ValueError("PaDiM needs at least one feature channel")
        if index.min() < 0 or index.max() >= self.total_channels or np.unique(index).size != index.size:
            raise ValueError(f"feature_index must hold distinct channels in [0, {self.total_channels}) "
                             f"(the layers {self.layers} give {self.total_channels})")
        self.feature_dim = int(index.size)
        sizes = self._probe_sizes()
        self.grid: Tuple[int, int] = sizes[self.layers[0]]
        self.positions = self.grid[0] * self.grid[1]
        # nearest resampling of the later taps to the grid: (row indices, column indices) or None
        self._nearest: Dict[str, Optional[Tuple[List[int], List[int]]]] = {
            tap: None if sizes[tap] == self.grid else (nearest_indices(sizes[tap][0], self.grid[0]),
                                                       nearest_indices(sizes[tap][1], self.grid[1]))
            for tap in self.layers[1:]}
        self._rows_up = bilinear_matrix(self.grid[0], self.image_size).tolist()
        self._cols_up = bilinear_matrix(self.grid[1], self.image_size).tolist()
        new_buffer(self, "feature_index", [self.feature_dim], "int64")
        new_buffer(self, "mean", [self.positions, self.feature_dim])
        new_buffer(self, "inv_covariance", [self.positions, self.feature_dim, self.feature_dim])
        self.feature_index.set_value(paddle.to_tensor(index, dtype="int64"))
        self.blur = GaussianBlur2D(self.blur_sigma, "reflect")

    def _probe_sizes(self) -> Dict[str, Tuple[int, int]]:
        """``{tap: (h, w)}`` at the model's input size (one forward of a 1-image zero batch)."""
        with paddle.no_grad():
            feats = self.backbone(paddle.zeros([1, 3, self.image_size, self.image_size], dtype="float32"))
        return {tap: (int(feats[tap].shape[2]), int(feats[tap].shape[3])) for tap in self.layers}

    def train(self, mode: bool = True) -> PadimModel:  # the frozen backbone never leaves eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def statistics_mb(self) -> float:
        """Size of ``mean`` + ``inv_covariance`` in float32, MB."""
        return 4.0 * self.positions * self.feature_dim * (self.feature_dim + 1) / 2 ** 20

    def embedding(self, x: paddle.Tensor) -> paddle.Tensor:
        """``[N, d, h, w]``: the taps on the first tap's grid (nearest), concatenated, channels
        ``feature_index`` kept in their stored order."""
        feats = self.backbone(x)
        parts = [feats[self.layers[0]]]
        for tap in self.layers[1:]:
            part, indices = feats[tap], self._nearest[tap]
            if indices is not None:
                part = paddle.index_select(part, paddle.to_tensor(indices[0], dtype="int64"), axis=2)
                part = paddle.index_select(part, paddle.to_tensor(indices[1], dtype="int64"), axis=3)
            parts.append(part)
        embedding = paddle.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        return paddle.index_select(embedding, self.feature_index, axis=1)

    def distance_map(self, embedding: paddle.Tensor) -> paddle.Tensor:
        """Per-position Mahalanobis distance ``[N, h, w]`` of an embedding ``[N, d, h, w]``; one
        batched ``[P, N, d] @ [P, d, d]`` product (memory ``P * N * d`` floats, as anomalib)."""
        height, width = self.grid
        vectors = embedding.reshape([-1, self.feature_dim, self.positions]).transpose([2, 0, 1])  # [P, N, d]
        delta = vectors - self.mean.unsqueeze(1)
        squared = (paddle.matmul(delta, self.inv_covariance) * delta).sum(axis=2)  # [P, N]
        distances = paddle.sqrt(paddle.clip(squared, min=0.0))
        return distances.transpose([1, 0]).reshape([-1, height, width])

    def maps_from_embedding(self, embedding: paddle.Tensor) -> Maps:
        """``(distance map [N, h, w], upsampled map [N, S, S], blurred map [N, S, S])``."""
        distances = self.distance_map(embedding)
        rows = paddle.to_tensor(self._rows_up, dtype=distances.dtype)  # [S, h]
        cols = paddle.to_tensor(self._cols_up, dtype=distances.dtype)  # [S, w]
        raw = paddle.matmul(paddle.matmul(rows, distances), cols, transpose_y=True)  # bilinear to [N, S, S]
        return distances, raw, self.blur(raw)

    def anomaly_maps(self, x: paddle.Tensor) -> Maps:
        """:meth:`maps_from_embedding` of the images ``x``."""
        return self.maps_from_embedding(self.embedding(x))

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        size = x.shape[-1]
        if isinstance(size, int) and size > 0 and size != self.image_size:
            raise ValueError(f"this PaDiM model was fitted at {self.image_size} px; got input of {size} px")
        maps = self.anomaly_maps(x)[2]
        return image_max(maps), maps


# --- building from a config -------------------------------------------------------------------------

#: the paper's d for its backbones (layer1-3: ResNet18 448 channels -> 100, WRN50-2 1792 -> 550)
PAPER_FEATURE_DIM = {"resnet18": 100, "wide_resnet50_2": 550}
#: cap for other backbones (EfficientNet-Lite): all channels up to this many
OTHER_MAX_FEATURE_DIM = 200


def default_feature_dim(backbone_name: str, total_channels: int) -> int:
    """``feature_dim: 0`` -> d.

    ResNet18 / Wide-ResNet50-2: the paper's 100 / 550 (at most ``total_channels``). Other backbones
    (EfficientNet-Lite): every channel when the taps give at most 200, else 200 drawn at random.
    Lite0's layer1-3 give 24 + 40 + 112 = 176 channels, already fewer than the 448 the paper reduces
    for ResNet18, so nothing is dropped and the default model does not depend on the seed (the
    paper reports a small loss from random reduction); the cap keeps the per-position cost ``d^2``
    within 4x of ResNet18's ``100^2`` for deeper tap choices (e.g. layer2-4: 472 channels -> 200).
    Cost at 256 px (64x64 positions): Lite0 d=176 is 508 MB of float32 inverse covariances
    (ResNet18 d=100: 164 MB).
    """
    if backbone_name in PAPER_FEATURE_DIM:
        return min(PAPER_FEATURE_DIM[backbone_name], total_channels)
    return min(OTHER_MAX_FEATURE_DIM, total_channels)


def draw_feature_index(total_channels: int, feature_dim: int, seed: int) -> np.ndarray:
    """``feature_dim`` distinct channels of ``total_channels`` drawn with ``default_rng(seed)``,
    sorted ascending (the order does not change a Mahalanobis distance; sorting only makes the
    gather contiguous-ish and the saved index readable). All channels: ``arange`` (no draw)."""
    if feature_dim == total_channels:
        return np.arange(total_channels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total_channels, size=feature_dim, replace=False)).astype(np.int64)


def build_model(config: Mapping[str, Any]) -> PadimModel:
    """The unfitted :class:`PadimModel` of ``config`` (keys ``backbone``, ``backbone_pretrained``,
    ``backbone_weights``, ``layers`` (empty: layer1-3), ``feature_dim`` (0: :func:`default_feature_dim`),
    ``seed``, ``mvtec_img_size``, ``blur_sigma``)."""
    from kdad.backbones import build_backbone

    layers = list(config.get("layers") or DEFAULT_LAYERS)
    backbone = build_backbone(config["backbone"], layers, pretrained=bool(config["backbone_pretrained"]),
                              weights_path=config.get("backbone_weights") or None)
    total = int(sum(backbone.channels(tap) for tap in layers))
    requested = int(config.get("feature_dim", 0) or 0)
    if requested < 0:
        raise ValueError(f"feature_dim must be >= 0 (0: the default), got {requested}")
    if requested > total:
        raise ValueError(f"feature_dim={requested} exceeds the {total} channels of {config['backbone']} "
                         f"{layers}; use at most {total} (0: the default)")
    feature_dim = requested or default_feature_dim(backbone.name, total)
    index = draw_feature_index(total, feature_dim, int(config["seed"]))
    return PadimModel(backbone, index, image_size=int(config["mvtec_img_size"]),
                      blur_sigma=float(config["blur_sigma"]), layers=layers)
