"""Input-gradient heatmap as a *forward-only* graph: the backward pass written out by hand.

``paddle.grad`` inside a static graph adds backward ops (``conv2d_grad``, ``pool2d_grad``, ...);
in Paddle 3.3.1 such a program runs in Paddle Inference with oneDNN **off** only (pool2d_grad fails
under oneDNN) and paddle2onnx aborts on it. This module computes the *same* gradient
``d sum(scores) / d x`` with forward ops only, so the exported ``heatmap/`` model
(:mod:`kdad.export`, the default ``heatmap_backward="explicit"``) converts to ONNX and runs in
onnxruntime, about twice as fast as Paddle Inference without oneDNN. Paddle Inference *with*
oneDNN runs it too but gives wrong maps in Paddle 3.3.1 (zero gradients after a max-pool with a 1x1
output; relative L2 errors of 0.5 on VGG16 at 128 px, 2 threads; individual ops are right, so it is
a layout problem of the whole program): the export marks the heatmap model oneDNN-off.

How each layer's gradient is written:

* conv (any stride, padding, groups): data gradient = ``conv2d_transpose`` with the conv's weight
  (then cropped to the input size, which also covers TF ``SAME`` asymmetric padding);
* BatchNorm in eval mode: multiply by ``gamma / sqrt(running_var + eps)`` per channel, folded
  into the backward conv's weight; the graph holds its own copies of these weights
  (:class:`BackwardWeights`);
* ReLU / ReLU6: multiply by the mask computed from the forward output, exactly as Paddle's
  ``relu_grad`` (``out > 0``) and ``relu6_grad`` (``0 < out < 6``) do; guided backprop
  (``gbp``, cloner ReLUs only, as :func:`kdad.methods.kdad.localization.guided_relus`) also clips the
  incoming gradient at 0;
* 2x2/2 max-pool: the gradient goes to the *first* maximum of each window in row-major order,
  the tie rule of Paddle's ``pool2d_grad`` (checked in the tests); built from strided slices,
  comparisons and a reshape (no ``F.interpolate``, which fails under oneDNN in 3.3.1);
* the KDAD distance of :mod:`kdad.methods.kdad.loss` (``(1 - cos) + lamda * MSE`` per flattened tap, the
  cosine exactly as ``F.cosine_similarity``: ``w12 / sqrt(clip(w1 * w2, eps^2))``) differentiated
  in closed form.

Scores come from :func:`kdad.methods.kdad.loss.per_image_distance` itself. The graph returns the same pair as
``kdad.export.AutogradHeatmapGraph``: ``(scores [N], sum_c |d sum(scores) / d x| [N, S, S])``.
``tests/test_explicit_gradient.py`` and every export check it against ``paddle.grad``. Supported
networks: VGG-style ``nn.Sequential`` stacks (the VGG16 expert and every cloner) and the
EfficientNet-Lite0 expert.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from kdad.methods.kdad.loss import per_image_distance
from kdad.methods.kdad.model import KDADModel

COSINE_EPS = 1e-8  # the default eps of F.cosine_similarity, used by kdad.methods.kdad.loss

Backward = Callable[[paddle.Tensor], paddle.Tensor]


# --- single layers -----------------------------------------------------------------------------


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def _conv_paddings(conv: nn.Conv2D, in_hw: Sequence[int]) -> List[Tuple[int, int]]:
    """``[(before, after)]`` for height and width as Paddle applies them in the forward conv."""
    kernel = conv.weight.shape[2:]
    stride = _pair(conv._stride)
    dilation = _pair(conv._dilation)
    padding = conv._padding
    result = []
    for axis in range(2):
        size, k, s, d = int(in_hw[axis]), int(kernel[axis]), stride[axis], dilation[axis]
        if isinstance(padding, str):
            if padding.upper() == "VALID":
                result.append((0, 0))
                continue
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            result.append((total // 2, total - total // 2))
        elif isinstance(padding, (list, tuple)) and len(padding) == 4:
            result.append((int(padding[2 * axis]), int(padding[2 * axis + 1])))
        elif isinstance(padding, (list, tuple)):
            p = int(padding[axis])
            result.append((p, p))
        else:
            result.append((int(padding), int(padding)))
    return result


def conv_data_grad(grad: paddle.Tensor, conv: nn.Conv2D, in_hw: Sequence[int],
                   out_scale: Optional[paddle.Tensor] = None,
                   weight: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """``d loss / d input`` of ``conv`` from ``d loss / d output`` (forward ops only).

    ``out_scale`` (``[C_out]``) multiplies the incoming gradient per output channel; it is folded
    into the weight instead of a broadcast multiply over the activation. ``weight`` replaces
    ``conv.weight`` (already scaled): the copies of :class:`BackwardWeights`.
    """
    if conv._data_format != "NCHW":
        raise ValueError("only NCHW convolutions are supported")
    if weight is None:
        weight = conv.weight
        if out_scale is not None:
            weight = weight * paddle.reshape(out_scale, [-1, 1, 1, 1])
    stride = _pair(conv._stride)
    dilation = _pair(conv._dilation)
    pads = _conv_paddings(conv, in_hw)
    kernel = [int(v) for v in conv.weight.shape[2:]]
    out_hw = [int(v) for v in grad.shape[2:]]
    full = [(out_hw[a] - 1) * stride[a] + (kernel[a] - 1) * dilation[a] + 1 for a in range(2)]
    symmetric = all(pads[a][0] == pads[a][1] and full[a] - 2 * pads[a][0] == int(in_hw[a]) for a in range(2))
    if symmetric:
        return F.conv2d_transpose(grad, weight, stride=list(stride), padding=[pads[0][0], pads[1][0]],
                                  dilation=list(dilation), groups=conv._groups)
    result = F.conv2d_transpose(grad, weight, stride=list(stride), padding=0, dilation=list(dilation),
                                groups=conv._groups)
    # padded coordinates -> input coordinates: drop `before`, keep `size`, zero-fill a short end
    extra = [max(pads[a][0] + int(in_hw[a]) - full[a], 0) for a in range(2)]
    if extra[0] or extra[1]:
        result = F.pad(result, [0, extra[1], 0, extra[0]])
    return result[:, :, pads[0][0]:pads[0][0] + int(in_hw[0]), pads[1][0]:pads[1][0] + int(in_hw[1])]


def bn_scale(bn: nn.BatchNorm2D) -> paddle.Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel, ``[C]`` (BatchNorm in eval mode)."""
    scale = paddle.rsqrt(bn._variance + bn._epsilon)
    if bn.weight is not None:
        scale = scale * bn.weight
    return scale


class BackwardWeights(nn.Layer):
    """The backward pass's own copy of every conv weight, with the scale of the eval-mode
    BatchNorm that follows it folded in (``W * gamma / sqrt(var + eps)`` per output channel).

    Folding once here saves a multiply per conv and call. Separate copies also keep the backward
    independent of inference passes that may rewrite a forward conv's weight (folding BatchNorm into
    it); whether Paddle Inference does that in place was not established. A snapshot: build the
    graph after the model's weights are final.
    """

    def __init__(self, pairs: Sequence[Tuple[nn.Conv2D, Optional[nn.BatchNorm2D]]]) -> None:
        super().__init__()
        self._index: Dict[Tuple[int, Optional[int]], int] = {}
        self.weights = nn.ParameterList()
        for conv, bn in pairs:
            key = (id(conv), None if bn is None else id(bn))
            if key in self._index:
                continue
            value = conv.weight.numpy()
            if bn is not None:
                value = value * bn_scale(bn).numpy().reshape(-1, 1, 1, 1)
            param = self.create_parameter(list(value.shape), dtype=str(value.dtype),
                                          default_initializer=nn.initializer.Assign(value))
            param.stop_gradient = True
            self._index[key] = len(self.weights)
            self.weights.append(param)

    def get(self, conv: nn.Conv2D, bn: Optional[nn.BatchNorm2D]) -> paddle.Tensor:
        return self.weights[self._index[(id(conv), None if bn is None else id(bn))]]


def sequential_conv_bn_pairs(features: nn.Sequential) -> List[Tuple[nn.Conv2D, Optional[nn.BatchNorm2D]]]:
    """``(conv, the BatchNorm right after it or None)`` for every conv of a VGG-style stack."""
    layers = list(features)
    following = layers[1:] + [None]
    return [(layer, after if isinstance(after, nn.BatchNorm2D) else None)
            for layer, after in zip(layers, following) if isinstance(layer, nn.Conv2D)]


def _keep(condition: paddle.Tensor, grad: paddle.Tensor) -> paddle.Tensor:
    """``grad`` where ``condition``, else 0 (same shapes: ``paddle.where`` broadcasts a scalar with
    extra ``full_like`` + ``add`` ops, which oneDNN runs slowly)."""
    return paddle.where(condition, grad, paddle.zeros_like(grad))


def relu_grad(grad: paddle.Tensor, out: paddle.Tensor, guided: bool = False) -> paddle.Tensor:
    # ``where`` rather than a multiply by a 0/1 mask: under oneDNN the multiply of a oneDNN-layout
    # tensor by a plain-layout mask was the slowest op of the whole graph (profiled).
    if guided:
        grad = paddle.clip(grad, min=0.0)
    return _keep(out > 0, grad)


def relu6_grad(grad: paddle.Tensor, out: paddle.Tensor) -> paddle.Tensor:
    return _keep(paddle.logical_and(out > 0, out < 6.0), grad)


def _interleave(m00, m01, m10, m11) -> paddle.Tensor:
    """Four ``[N, C, h, w]`` grids -> ``[N, C, 2h, 2w]`` with ``m_ab`` at offsets ``(a, b)``."""
    row0 = paddle.stack([m00, m01], axis=-1)  # [N, C, h, w, 2]
    row1 = paddle.stack([m10, m11], axis=-1)
    blocks = paddle.stack([row0, row1], axis=3)  # [N, C, h, 2, w, 2]
    shape = m00.shape
    return paddle.reshape(blocks, [-1, shape[1], 2 * shape[2], 2 * shape[3]])


def maxpool2x2_grad(grad: paddle.Tensor, x: paddle.Tensor, out: paddle.Tensor) -> paddle.Tensor:
    """Gradient of a 2x2 stride-2 max-pool: to the first maximum (row-major) of each window."""
    e00 = x[:, :, 0::2, 0::2] == out
    e01 = x[:, :, 0::2, 1::2] == out
    e10 = x[:, :, 1::2, 0::2] == out
    e11 = x[:, :, 1::2, 1::2] == out
    taken01 = e00
    taken10 = paddle.logical_or(e00, e01)
    taken11 = paddle.logical_or(taken10, e10)
    return _interleave(_keep(e00, grad),
                       _keep(paddle.logical_and(e01, paddle.logical_not(taken01)), grad),
                       _keep(paddle.logical_and(e10, paddle.logical_not(taken10)), grad),
                       _keep(paddle.logical_and(e11, paddle.logical_not(taken11)), grad))


def maxpool2x2_grad_unpool(grad: paddle.Tensor, x: paddle.Tensor) -> paddle.Tensor:
    """The same gradient through ``max_pool2d(return_mask=True)`` + ``max_unpool2d`` (two native ops;
    Paddle's pooling index is also the first maximum in row-major order)."""
    _, index = F.max_pool2d(x, 2, 2, return_mask=True)
    return F.max_unpool2d(grad, index, 2, 2, output_size=[int(x.shape[2]), int(x.shape[3])])


def _add(a: Optional[paddle.Tensor], b: Optional[paddle.Tensor]) -> Optional[paddle.Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


# --- networks: forward with a record, then the hand-written backward ------------------------------


def sequential_forward(features: nn.Sequential, taps: Sequence[int], x: paddle.Tensor,
                       last_tap: Optional[int] = None):
    """``run_taps`` of :mod:`kdad.backbones.vgg` that also records what the backward needs.

    Returns ``(tap outputs, records)``; stops after layer ``taps[last_tap]`` (default: the last).
    """
    stop = taps[-1] if last_tap is None else taps[last_tap]
    wanted = set(taps)
    outputs: List[paddle.Tensor] = []
    records = []
    for index, layer in enumerate(features):
        y = layer(x)
        records.append((index, layer, x, y))
        if index in wanted:
            outputs.append(y)
        x = y
        if index == stop:
            break
    return outputs, records


def sequential_backward(records, taps: Sequence[int], tap_grads: Dict[int, paddle.Tensor],
                        guided: bool = False, pool_grad: str = "mask",
                        weights: Optional[BackwardWeights] = None) -> paddle.Tensor:
    """``d loss / d input`` of a recorded VGG-style stack, given ``d loss / d tap`` (tap index -> grad)."""
    layer_of_tap = {taps[t]: t for t in tap_grads}
    grad: Optional[paddle.Tensor] = None
    pending_bn: Optional[nn.BatchNorm2D] = None  # a BatchNorm, folded into the conv before it
    for index, layer, x, y in reversed(records):
        if index in layer_of_tap:
            if pending_bn is not None:
                raise ValueError("a tap between a conv and its BatchNorm is not supported")
            grad = _add(grad, tap_grads[layer_of_tap[index]])
        if grad is None:
            continue
        if pending_bn is not None and not isinstance(layer, nn.Conv2D):
            raise ValueError("a BatchNorm must directly follow a conv")
        if isinstance(layer, nn.Conv2D):
            if weights is not None:
                grad = conv_data_grad(grad, layer, x.shape[2:], weight=weights.get(layer, pending_bn))
            else:
                scale = None if pending_bn is None else bn_scale(pending_bn)
                grad = conv_data_grad(grad, layer, x.shape[2:], scale)
            pending_bn = None
        elif isinstance(layer, nn.BatchNorm2D):
            pending_bn = layer
        elif isinstance(layer, nn.ReLU):
            grad = relu_grad(grad, y, guided)
        elif isinstance(layer, nn.MaxPool2D):
            if _pair(layer.ksize) != (2, 2) or _pair(layer.stride or layer.ksize) != (2, 2) or \
                    _pair(layer.padding) != (0, 0):
                raise ValueError("only 2x2 stride-2 max-pooling without padding is supported")
            grad = maxpool2x2_grad(grad, x, y) if pool_grad == "mask" else maxpool2x2_grad_unpool(grad, x)
        else:
            raise TypeError(f"no hand-written backward for {type(layer).__name__}")
    if grad is None:
        raise ValueError("no tap gradient reached the input")
    return grad


def _convbn_forward(block, x):
    y = block.bn(block.conv(x))
    if block.act is not None:
        y = block.act(y)
    return y, (block, x, y)


def _convbn_backward(record, grad, weights: Optional[BackwardWeights] = None):
    block, x, y = record
    if block.act is not None:
        if not isinstance(block.act, nn.ReLU6):
            raise TypeError(f"no hand-written backward for {type(block.act).__name__}")
        grad = relu6_grad(grad, y)
    if weights is not None:
        return conv_data_grad(grad, block.conv, x.shape[2:], weight=weights.get(block.conv, block.bn))
    return conv_data_grad(grad, block.conv, x.shape[2:], bn_scale(block.bn))


def efficientnet_conv_bn_pairs(expert) -> List[Tuple[nn.Conv2D, Optional[nn.BatchNorm2D]]]:
    """``(conv, its BatchNorm)`` of every conv block of the EfficientNet-Lite0 expert."""
    backbone = expert.backbone
    blocks = [backbone.stem, backbone.head]
    for block in backbone.blocks:
        blocks += [b for b in (block.expand, block.depthwise, block.project) if b is not None]
    return [(b.conv, b.bn) for b in blocks]


def efficientnet_forward(expert, x: paddle.Tensor):
    """Taps of :class:`EfficientNetLite0Expert` plus a record for :func:`efficientnet_backward`."""
    from kdad.backbones.efficientnet_lite import normalize_input

    backbone = expert.backbone
    feats: Dict[str, paddle.Tensor] = {}
    y, stem = _convbn_forward(backbone.stem, normalize_input(x))
    feats["stem"] = y
    blocks = []
    for index, block in enumerate(backbone.blocks):
        block_in = y
        expand = None
        expanded = block_in
        if block.expand is not None:
            expanded, expand = _convbn_forward(block.expand, block_in)
            feats[f"blocks.{index}.expand"] = expanded
        depthwise, dw = _convbn_forward(block.depthwise, expanded)
        feats[f"blocks.{index}.depthwise"] = depthwise
        y, project = _convbn_forward(block.project, depthwise)
        if block.use_skip:
            y = y + block_in
        feats[f"blocks.{index}"] = y
        blocks.append((index, block.use_skip, expand, dw, project))
    y, head = _convbn_forward(backbone.head, y)
    feats["head"] = y
    return [feats[name] for name in expert.tap_names], (stem, blocks, head)


def efficientnet_backward(expert, record, tap_grads: Dict[int, paddle.Tensor],
                          weights: Optional[BackwardWeights] = None) -> paddle.Tensor:
    from kdad.backbones.efficientnet_lite import INPUT_STD

    stem, blocks, head = record
    named = {expert.tap_names[t]: g for t, g in tap_grads.items()}
    grad = named.get("head")
    if grad is not None:
        grad = _convbn_backward(head, grad, weights)
    for index, use_skip, expand, dw, project in reversed(blocks):
        grad = _add(grad, named.get(f"blocks.{index}"))
        if grad is None:
            continue
        block_out_grad = grad
        grad = _convbn_backward(project, grad, weights)
        grad = _add(grad, named.get(f"blocks.{index}.depthwise"))
        grad = _convbn_backward(dw, grad, weights)
        if expand is not None:
            grad = _add(grad, named.get(f"blocks.{index}.expand"))
            grad = _convbn_backward(expand, grad, weights)
        if use_skip:
            grad = grad + block_out_grad
    grad = _add(grad, named.get("stem"))
    grad = _convbn_backward(stem, grad, weights)
    return grad / INPUT_STD


# --- the KDAD distance ----------------------------------------------------------------------------


def distance_grads(cloner: paddle.Tensor, expert: paddle.Tensor, lamda: float,
                   direction_only: bool) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """``(d/d cloner, d/d expert)`` of one tap's ``(1 - cos) + lamda * MSE`` per image."""
    axes = list(range(1, len(cloner.shape)))
    keep = [-1] + [1] * len(axes)
    w12 = paddle.reshape(paddle.sum(cloner * expert, axis=axes), keep)
    w1 = paddle.reshape(paddle.sum(cloner * cloner, axis=axes), keep)
    w2 = paddle.reshape(paddle.sum(expert * expert, axis=axes), keep)
    product = w1 * w2
    n12 = paddle.sqrt(paddle.clip(product, min=COSINE_EPS * COSINE_EPS))
    active = paddle.cast(product > COSINE_EPS * COSINE_EPS, cloner.dtype)
    k = active * w12 / (n12 * n12 * n12)
    # d(1 - cos)/dc = -(e / n12 - w12 * w2 * c / n12^3); likewise for e
    grad_c = k * w2 * cloner - expert / n12
    grad_e = k * w1 * expert - cloner / n12
    if not direction_only:
        elements = 1
        for size in cloner.shape[1:]:
            elements *= int(size)
        diff = (cloner - expert) * (2.0 * lamda / elements)
        grad_c = grad_c + diff
        grad_e = grad_e - diff
    return grad_c, grad_e


# --- the graph ------------------------------------------------------------------------------------


class ExplicitGradientGraph(nn.Layer):
    """``x -> (scores [N], sum_c |d sum(scores) / d x| [N, S, S])`` with forward ops only.

    ``guided=True`` gives guided backprop through the cloner's ReLUs (the ``gbp`` method).
    """

    def __init__(self, model: KDADModel, guided: bool = False, pool_grad: str = "mask") -> None:
        super().__init__()
        if pool_grad not in ("mask", "unpool"):
            raise ValueError("pool_grad must be 'mask' (slices, compares, where: ONNX-friendly) or 'unpool'")
        self.model = model
        self.guided = bool(guided)
        self.pool_grad = pool_grad
        self.efficientnet = hasattr(model.expert, "backbone")
        if not self.efficientnet and not hasattr(model.expert, "features"):
            raise TypeError(f"no hand-written backward for expert {type(model.expert).__name__}")
        pairs = sequential_conv_bn_pairs(model.cloner.features)
        pairs += (efficientnet_conv_bn_pairs(model.expert) if self.efficientnet
                  else sequential_conv_bn_pairs(model.expert.features))
        self.backward_weights = BackwardWeights(pairs)

    def gradients(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``(scores [N], d sum(scores) / d x [N, 3, S, S])``."""
        m = self.model
        cloner_feats, cloner_rec = sequential_forward(m.cloner.features, m.cloner.taps, x)
        if self.efficientnet:
            expert_feats, expert_rec = efficientnet_forward(m.expert, x)
        else:
            expert_feats, expert_rec = sequential_forward(m.expert.features, m.expert.taps, x)
        scores = per_image_distance(cloner_feats, expert_feats, m.score_taps, m.lamda, m.direction_only)
        cloner_grads, expert_grads = {}, {}
        for tap in m.score_taps:
            cloner_grads[tap], expert_grads[tap] = distance_grads(cloner_feats[tap], expert_feats[tap],
                                                                  m.lamda, m.direction_only)
        weights = self.backward_weights
        grad = sequential_backward(cloner_rec, m.cloner.taps, cloner_grads, guided=self.guided,
                                   pool_grad=self.pool_grad, weights=weights)
        if self.efficientnet:
            grad = grad + efficientnet_backward(m.expert, expert_rec, expert_grads, weights)
        else:
            grad = grad + sequential_backward(expert_rec, m.expert.taps, expert_grads,
                                              pool_grad=self.pool_grad, weights=weights)
        return scores, grad

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        scores, grad = self.gradients(x)
        return scores, paddle.sum(paddle.abs(grad), axis=1)


def export_explicit_heatmap(model: KDADModel, folder: str, size: int, guided: bool = False,
                            pool_grad: str = "mask") -> str:
    """``paddle.jit.save`` the graph to ``<folder>/model.json``; returns the model file path."""
    import os

    graph = ExplicitGradientGraph(model, guided=guided, pool_grad=pool_grad)
    graph.eval()
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", name="x")]
    static = paddle.jit.to_static(graph, input_spec=spec, full_graph=True)
    os.makedirs(folder, exist_ok=True)
    paddle.jit.save(static, os.path.join(folder, "model"))
    return os.path.join(folder, "model.json")
