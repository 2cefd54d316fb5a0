"""Localization maps: the gradient of the KDAD score with respect to the input image.

Three methods, as in the original code: ``gradients`` (vanilla backprop, the paper's default),
``smooth_grad`` and ``gbp`` (guided backprop through the cloner's ReLUs). All differentiate
:meth:`KDADModel.score`, i.e. the single distance of :mod:`kdad.methods.kdad.loss`.

Two kinds of map are produced from the input gradient ``g``:

* the *paper map*: ``sum_c |g|`` scaled per image by (min, 99th percentile), clipped to [0, 1],
  then Gaussian-blurred (sigma 4). Used for the paper's localization AUC.
* the *raw map*: ``sum_c |g|`` Gaussian-blurred, without per-image scaling, so maps of different
  images are comparable. Used for pixel AUROC / AUPRO and for heatmaps in deployment.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from kdad.methods.kdad.model import KDADModel
from kdad.postprocess import blur


def channel_abs_sum(grads: np.ndarray) -> np.ndarray:
    """``sum_c |g|``: [N,C,H,W] -> [N,H,W]."""
    return np.abs(grads).sum(axis=1)


def normalize_per_image(maps: np.ndarray) -> np.ndarray:
    """Scale each map by its (min, 99th percentile) and clip to [0, 1] (the original code)."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1)
    high = np.percentile(flat, 99, axis=1)
    span = np.where(high - low > 0, high - low, 1.0)
    scaled = (maps - low[:, None, None]) / span[:, None, None]
    return np.clip(scaled, 0.0, 1.0)


def paper_maps_from_gradients(grads: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """The paper's localization map from input gradients [N,3,H,W]."""
    return blur(normalize_per_image(channel_abs_sum(grads)), sigma)


def raw_maps_from_gradients(grads: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Blurred ``sum_c |g|`` without per-image scaling (comparable across images)."""
    return blur(channel_abs_sum(grads), sigma)


def input_gradients(model: KDADModel, images: paddle.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Scores ``[N]`` and ``d score_i / d image_i`` ``[N,3,H,W]`` for one batch.

    The gradient of the *sum* of per-image scores is taken, so (BatchNorm in eval mode) every
    image's gradient is independent of the others in the batch.
    """
    x = images.detach().clone()
    x.stop_gradient = False
    scores = model.score(x)
    (grad,) = paddle.grad(paddle.sum(scores), x)
    return scores.numpy(), grad.numpy()


class _GuidedReLUFunction(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        out = paddle.nn.functional.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (out,) = ctx.saved_tensor()
        return paddle.clip(grad_out, min=0.0) * paddle.cast(out > 0, grad_out.dtype)


class GuidedReLU(nn.Layer):
    """ReLU whose backward passes only positive gradients where the output is positive."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return _GuidedReLUFunction.apply(x)


@contextlib.contextmanager
def guided_relus(layer: nn.Layer) -> Iterator[None]:
    """Temporarily replace every ``nn.ReLU`` inside ``layer`` by :class:`GuidedReLU`."""
    replaced: List[Tuple[nn.Layer, str, nn.Layer]] = []
    for parent in [layer] + list(layer.sublayers()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                replaced.append((parent, name, child))
                setattr(parent, name, GuidedReLU())
    try:
        yield
    finally:
        for parent, name, child in replaced:
            setattr(parent, name, child)


def smooth_grad(
    model: KDADModel, images: paddle.Tensor, samples: int, sigma_multiplier: float, seed: int = 0
) -> np.ndarray:
    """SmoothGrad as in the original code, batched: the mean over noisy copies of the
    per-image-normalised gradient map. The noise standard deviation is ``sigma ** 2`` with
    ``sigma = sigma_multiplier / (max - min)`` of each image (the original's convention)."""
    rng = np.random.default_rng(seed)
    data = images.numpy()
    span = data.reshape(len(data), -1).max(axis=1) - data.reshape(len(data), -1).min(axis=1)
    sigma = sigma_multiplier / np.where(span > 0, span, 1.0)
    total = np.zeros((data.shape[0], data.shape[2], data.shape[3]), dtype=np.float64)
    for _ in range(samples):
        noise = rng.standard_normal(data.shape).astype(np.float32) * (sigma**2)[:, None, None, None]
        _, grads = input_gradients(model, paddle.to_tensor(data + noise.astype(np.float32)))
        total += normalize_per_image(channel_abs_sum(grads))
    return (total / samples).astype(np.float32)


def _min_max(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    span = np.where(high - low > 0, high - low, 1.0)
    return (maps - low[:, None, None]) / span[:, None, None]


def localization_maps(
    model: KDADModel,
    images: paddle.Tensor,
    method: str = "gradients",
    sigma: float = 4.0,
    smoothgrad_samples: int = 50,
    smoothgrad_sigma: float = 0.05,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores, paper_maps, raw_maps)`` for one batch with the chosen method."""
    model.eval()
    if method == "gradients":
        scores, grads = input_gradients(model, images)
        return scores, paper_maps_from_gradients(grads, sigma), raw_maps_from_gradients(grads, sigma)
    if method == "smooth_grad":
        scores, grads = input_gradients(model, images)
        averaged = smooth_grad(model, images, smoothgrad_samples, smoothgrad_sigma)
        return scores, blur(_min_max(averaged), sigma), raw_maps_from_gradients(grads, sigma)
    if method == "gbp":
        with guided_relus(model.cloner):
            scores, grads = input_gradients(model, images)
        guided = normalize_per_image(channel_abs_sum(grads))
        return scores, blur(_min_max(guided), sigma), blur(channel_abs_sum(grads), sigma)
    if method == "feature_map":  # forward only: the map of the exported feature_map/ model
        from kdad.methods.kdad.feature_maps import feature_distance_map
        from kdad.methods.kdad.loss import per_image_distance

        with paddle.no_grad():
            cloner_feats, expert_feats = model.features(images)
            scores = per_image_distance(cloner_feats, expert_feats, model.score_taps, model.lamda,
                                        model.direction_only)
            maps = feature_distance_map(cloner_feats, expert_feats, model.score_taps, model.lamda,
                                        model.direction_only, int(images.shape[-1])).numpy()
        return scores.numpy(), blur(normalize_per_image(maps), sigma), blur(maps, sigma)
    raise ValueError(f"unknown localization method '{method}' (gradients, smooth_grad, gbp, feature_map)")
