"""PatchCore's exportable network (Roth et al., CVPR 2022; anomalib 2.7's ``PatchcoreModel``).

Image in, ``(scores [N], maps [N, S, S])`` out, with the memory bank inside as a buffer, so
``paddle.jit.save`` of the model is the whole scorer:

* embedding: backbone ``layers`` (default layer2, layer3), each 3x3 average pooled (stride 1,
  padding 1, padding counted), the deeper ones bilinearly resized to the first one's grid,
  concatenated along channels; one vector per patch, rows ordered (image, y, x);
* patch score: Euclidean distance to the nearest memory-bank row by the expansion anomalib uses,
  ``sqrt(clamp(|x|^2 - 2 x.y + |y|^2, 0))``;
* image score: the largest patch score times the paper's re-weighting
  ``1 - softmax(d(x*, N_b(m*)))[0]`` (``N_b(m*)``: the ``num_neighbors`` bank rows nearest to the
  nearest neighbour ``m*`` of the worst patch ``x*``, ``m*`` first);
* map: patch scores nearest-upsampled to the input size, then Gaussian blur (reflect padding).

Both resamplings are fixed index selections / interpolation matrices (:mod:`kdad.layers`) with the
values of ``F.interpolate``, so the exported graph has no interpolation op and Paddle Inference runs it
with oneDNN; the model is built for one input size (``image_size``).

Bounded memory: the patch-to-bank distances are computed in chunks of bank rows, keeping a running
minimum, so the scratch memory is about ``2 x rows x chunk x 4`` bytes whatever the bank size (rows =
batch x patches; without chunks 8 images x 1024 patches x 80k bank rows would be 2.6 GB per
temporary). The dynamic graph sizes the chunk from the rows (:data:`DIST_BUDGET` elements per
temporary, at least 256 bank rows). The exported static graph has a dynamic batch, so its loop is
unrolled at export time (one block of ops per chunk) with the fixed chunk
:attr:`PatchcoreModel.bank_chunk` (default 2048 rows: 67 MB per temporary for a batch of 8 images of
1024 patches; the limit is thus per batch: keep the inference batch small for large images).
Measured at 256 px, 80k x 152 bank, batch 4: peak RSS +220 MB in the dynamic graph, +36 MB in Paddle
Inference. The re-weighting needs ``batch x bank`` distances only.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn.functional as F

from kdad.backbones.base import Backbone
from kdad.layers import GaussianBlur2D, MatrixResize, nearest_indices
from kdad.methods.base import AnomalyModel, new_buffer

#: elements of one [rows, bank chunk] temporary in the dynamic graph (16M floats = 64 MB)
DIST_BUDGET = 1 << 24
#: bank rows per chunk of the exported (static) graph
DEFAULT_BANK_CHUNK = 2048


def squared_distances(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """``|x|^2 - 2 x.y + |y|^2`` for ``x [..., R, D]``, ``y [..., M, D]`` -> ``[..., R, M]`` (unclamped)."""
    x_norm = paddle.sum(x * x, axis=-1, keepdim=True)
    y_norm = paddle.sum(y * y, axis=-1, keepdim=True)
    return x_norm - 2.0 * paddle.matmul(x, y, transpose_y=True) + paddle.transpose(
        y_norm, list(range(y_norm.ndim - 2)) + [y_norm.ndim - 1, y_norm.ndim - 2])


def euclidean_distances(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """anomalib's ``euclidean_dist``: ``sqrt(clamp(|x|^2 - 2 x.y + |y|^2, 0))``."""
    return paddle.sqrt(paddle.clip(squared_distances(x, y), min=0.0))


def nearest_in_bank(x: paddle.Tensor, bank: paddle.Tensor, chunk: int) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Distance of each row of ``x [R, D]`` to its nearest row of ``bank [M, D]`` and that row's
    index (the first one on exact ties), scanning the bank ``chunk`` rows at a time.

    Per chunk one product ``|y|^2 - 2 x.y`` (``-2x`` scaled once), its argmin and the value there;
    ``|x|^2`` is constant along a row, so it is added to the running minimum only at the end (the
    same distances as anomalib's ``|x|^2 - 2 x.y + |y|^2`` up to float rounding). No ``addmm``:
    paddle2onnx 2.1.0 cannot convert it.
    """
    m = int(bank.shape[0])
    chunk = max(1, min(int(chunk), m))
    best = paddle.zeros([1], dtype=x.dtype)
    best_idx = paddle.zeros([1], dtype="int64")
    x_scaled = x * -2.0
    for start in range(0, m, chunk):
        part = bank[start:min(start + chunk, m)]
        part_norm = paddle.sum(part * part, axis=1).unsqueeze(0)
        partial = paddle.matmul(x_scaled, part, transpose_y=True) + part_norm  # paddle2onnx lacks addmm
        part_idx = paddle.argmin(partial, axis=1)
        part_min = paddle.take_along_axis(partial, part_idx.unsqueeze(1), axis=1).squeeze(1)
        part_idx = part_idx + start
        if start == 0:
            best, best_idx = part_min, part_idx
        else:
            better = part_min < best  # strict: the first minimum wins, as one argmin over the bank
            best = paddle.where(better, part_min, best)
            best_idx = paddle.where(better, part_idx, best_idx)
    x_norm = paddle.sum(x * x, axis=1)
    return paddle.sqrt(paddle.clip(best + x_norm, min=0.0)), best_idx


class PatchcoreModel(AnomalyModel):
    """PatchCore scorer: frozen ``backbone``, buffer ``memory_bank [M, D]`` (set by fitting)."""

    method = "patchcore"

    def __init__(self, backbone: Backbone, layers: Sequence[str] = ("layer2", "layer3"),
                 image_size: int = 256, blur_sigma: float = 4.0, num_neighbors: int = 9,
                 bank_chunk: int = DEFAULT_BANK_CHUNK) -> None:
        super().__init__()
        if not layers:
            raise ValueError("PatchCore needs at least one backbone layer")
        missing = [layer for layer in layers if layer not in backbone.taps]
        if missing:
            raise ValueError(f"backbone '{backbone.name}' was built without the tap(s) {missing}")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
        self.backbone = backbone
        self.backbone_name = backbone.name
        self.layers = list(layers)
        self.image_size = int(image_size)
        self.num_neighbors = int(num_neighbors)
        self.bank_chunk = int(bank_chunk)
        self.feature_dim = int(sum(backbone.channels(layer) for layer in self.layers))
        self.feature_stride = int(backbone.stride(self.layers[0]))
        self.blur = GaussianBlur2D(blur_sigma, "reflect")
        new_buffer(self, "memory_bank", [1, self.feature_dim])  # placeholder until fitted / loaded
        # the resamplings as fixed matrices / indices (no interpolation op: the exported graph runs under
        # oneDNN, whose interpolation kernels fail in Paddle Inference 3.3.1)
        with paddle.no_grad():
            probe = self.backbone(paddle.zeros([1, 3, self.image_size, self.image_size], dtype="float32"))
        sizes = {layer: (int(probe[layer].shape[2]), int(probe[layer].shape[3])) for layer in self.layers}
        self.grid: Tuple[int, int] = sizes[self.layers[0]]
        self._to_grid = [None if sizes[layer] == self.grid else MatrixResize(sizes[layer], self.grid)
                         for layer in self.layers[1:]]
        self._up_rows = nearest_indices(self.grid[0], self.image_size)
        self._up_cols = nearest_indices(self.grid[1], self.image_size)

    # --- the memory bank -----------------------------------------------------------------------
    @property
    def bank_size(self) -> int:
        return int(self.memory_bank.shape[0])

    def set_memory_bank(self, bank: np.ndarray) -> None:
        """Replace the memory bank by ``bank [M, D]`` (float32)."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[1] != self.feature_dim or bank.shape[0] < 1:
            raise ValueError(f"memory bank must be [M >= 1, {self.feature_dim}], got {list(bank.shape)}")
        new_buffer(self, "memory_bank", bank.shape)
        self.memory_bank.set_value(bank)

    def resize_buffers(self, state: Mapping[str, object]) -> None:
        """Give ``memory_bank`` the checkpoint's number of rows (any M loads)."""
        if "memory_bank" not in state:
            return
        shape = list(np.shape(state["memory_bank"]))
        if len(shape) != 2 or shape[1] != self.feature_dim or shape[0] < 1:
            raise ValueError(f"memory_bank has shape {shape}; this PatchCore model needs "
                             f"[M, {self.feature_dim}] ({'+'.join(self.layers)} of {self.backbone_name})")
        new_buffer(self, "memory_bank", shape)

    # --- the network ---------------------------------------------------------------------------
    def pooled_features(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        """The backbone ``layers`` of ``x [N, 3, S, S]`` (in [0, 1]), each 3x3 average pooled (stride 1,
        padding 1, padding counted: always / 9, torch's ``count_include_pad``)."""
        feats = self.backbone(x)
        # zero padding made explicit, then an unpadded pool: the values of padding=1 with exclusive=False,
        # which Paddle Inference 3.3.1 with oneDNN got wrong (exported scores off by 3.7% of their maximum)
        return [F.avg_pool2d(F.pad(feats[layer], [1, 1, 1, 1]), kernel_size=3, stride=1, padding=0)
                for layer in self.layers]

    def combine(self, pooled: Sequence[paddle.Tensor]) -> paddle.Tensor:
        """Pooled layers -> ``[N, D, h, w]``: the deeper ones bilinearly (align_corners False) resized to
        the first one's grid, concatenated along channels."""
        parts = [pooled[0]] + [part if resize is None else resize(part)
                               for part, resize in zip(pooled[1:], self._to_grid)]
        return paddle.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def embed(self, x: paddle.Tensor) -> paddle.Tensor:
        """Locally aware patch features ``[N, D, h, w]`` of images ``x [N, 3, S, S]`` in [0, 1]."""
        return self.combine(self.pooled_features(x))

    def _chunk_for(self, rows: int) -> int:
        if paddle.in_dynamic_mode() and rows > 0:
            return max(256, DIST_BUDGET // rows)
        return self.bank_chunk

    def score_embedding(self, embedding: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        """Everything PatchCore computes from ``embedding [N, D, h, w]``: ``patch_scores [N, h, w]``,
        ``nn_locations``, ``max_patch``, ``score_star``, ``nn_index``, ``support_samples``,
        ``support_distances``, ``reweight`` and ``scores [N]``."""
        dim, h, w = int(embedding.shape[1]), int(embedding.shape[2]), int(embedding.shape[3])
        hw = h * w
        rows = paddle.transpose(embedding, [0, 2, 3, 1]).reshape([-1, dim])
        bank = self.memory_bank
        n_rows = int(rows.shape[0]) if paddle.in_dynamic_mode() else -1
        patch, location = nearest_in_bank(rows, bank, self._chunk_for(n_rows))
        patch_scores = patch.reshape([-1, hw])
        locations = location.reshape([-1, hw])
        max_patch = paddle.argmax(patch_scores, axis=1)
        score_star = paddle.take_along_axis(patch_scores, max_patch.unsqueeze(1), axis=1).squeeze(1)
        out = {"patch_scores": patch_scores.reshape([-1, h, w]),
               "nn_locations": locations.reshape([-1, h, w]),
               "max_patch": max_patch, "score_star": score_star}
        if self.num_neighbors == 1:
            out["scores"] = score_star
            return out
        k = min(self.num_neighbors, self.bank_size)
        nn_index = paddle.take_along_axis(locations, max_patch.unsqueeze(1), axis=1).squeeze(1)
        per_image = rows.reshape([-1, hw, dim])
        star_feat = paddle.take_along_axis(per_image, max_patch.reshape([-1, 1, 1]), axis=1,
                                           broadcast=True)  # [N, 1, D]
        nn_sample = paddle.gather(bank, nn_index)  # [N, D]
        _, support = paddle.topk(euclidean_distances(nn_sample, bank), k=k, axis=1, largest=False)
        support_feat = paddle.gather(bank, support.reshape([-1])).reshape([-1, k, dim])
        distances = euclidean_distances(star_feat, support_feat).squeeze(1)  # [N, k]
        reweight = 1.0 - F.softmax(distances, axis=1)[:, 0]
        out.update(nn_index=nn_index, support_samples=support, support_distances=distances,
                   reweight=reweight, scores=reweight * score_star)
        return out

    def anomaly_maps(self, patch_scores: paddle.Tensor) -> paddle.Tensor:
        """``patch_scores [N, h, w]`` -> nearest upsampling to the input size (``F.interpolate``'s
        nearest, as fixed indices), blur: ``[N, S, S]``."""
        rows = paddle.to_tensor(self._up_rows, dtype="int64")
        cols = paddle.to_tensor(self._up_cols, dtype="int64")
        upsampled = paddle.index_select(paddle.index_select(patch_scores, rows, axis=1), cols, axis=2)
        return self.blur(upsampled)

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Images ``[N, 3, S, S]`` in [0, 1] -> ``(scores [N], anomaly maps [N, S, S])``."""
        size = x.shape[-1]
        if isinstance(size, int) and size > 0 and size != self.image_size:
            raise ValueError(f"this PatchCore model was fitted at {self.image_size} px; got input of "
                             f"{size} px")
        out = self.score_embedding(self.embed(x))
        return out["scores"], self.anomaly_maps(out["patch_scores"])


def build_model(config: Mapping[str, object]) -> PatchcoreModel:
    """The unfitted PatchCore model of ``config`` (backbone with its pretrained weights loaded)."""
    from kdad.backbones import build_backbone

    layers = list(config.get("layers") or []) or ["layer2", "layer3"]
    backbone = build_backbone(str(config["backbone"]), layers, pretrained=bool(config["backbone_pretrained"]),
                              weights_path=str(config.get("backbone_weights") or "") or None)
    return PatchcoreModel(backbone, layers, image_size=int(config["mvtec_img_size"]),
                          blur_sigma=float(config["blur_sigma"]), num_neighbors=int(config["num_neighbors"]),
                          bank_chunk=int(config.get("patchcore_bank_chunk", DEFAULT_BANK_CHUNK)))
