"""FLOPs counted on the real layers with forward hooks: any model's convolutions, transposed
convolutions and linear layers (:func:`count_layers`, used by ``bench_trained.py`` and
``bench_methods.py``), and KDAD's expert and cloner per image (:func:`model_flops`).

A convolution costs ``2 * C_out * H_out * W_out * (C_in / groups) * k_h * k_w`` FLOPs (one multiply
and one add per MAC); BatchNorm, activations, pooling and the distance are left out (well under 1%
here). The counts cover what scoring runs: every layer up to the last tap (``run_taps`` stops
there). Training and gradient costs are derived from the forward counts:

* the data gradient of a conv costs as much as its forward (a transposed conv), except the first
  conv of a network, whose input gradient is only needed for heatmaps;
* the weight gradient of a conv costs as much as its forward.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import paddle
import paddle.nn as nn

#: the layers whose products are counted (every other op is left out)
COUNTED_LAYERS = (nn.Conv2D, nn.Conv2DTranspose, nn.Linear)


def layer_cost(layer: nn.Layer, inputs: Any, output: Any) -> int:
    """FLOPs of one call of a ``Conv2D``, ``Conv2DTranspose`` or ``Linear`` over all its inputs.

    Conv: ``2 * N * C_out * H_out * W_out * C_in/groups * kh * kw``; transposed conv (weight
    ``[C_in, C_out/groups, kh, kw]``): ``2 * N * C_in * H_in * W_in * C_out/groups * kh * kw``; Linear
    (weight ``[in, out]``): ``2 * rows * in * out`` with ``rows`` the input's elements / ``in``."""
    shape = [int(v) for v in layer.weight.shape]
    if isinstance(layer, nn.Linear):
        rows = int(np.prod([int(v) for v in inputs[0].shape])) // shape[0]
        return 2 * rows * shape[0] * shape[1]
    if isinstance(layer, nn.Conv2DTranspose):
        c_in, c_out_per_group, k_h, k_w = shape
        n, _, h_in, w_in = [int(v) for v in inputs[0].shape]
        return 2 * n * c_in * h_in * w_in * c_out_per_group * k_h * k_w
    c_out, c_in_per_group, k_h, k_w = shape
    n, _, h_out, w_out = [int(v) for v in output.shape]
    return 2 * n * c_out * h_out * w_out * c_in_per_group * k_h * k_w


def count_layers(scope: nn.Layer, call: Callable[[], Any]) -> Tuple[List[Dict[str, Any]], Any]:
    """``(records, call())``: one record per call of a counted layer of ``scope`` during ``call()``
    (in order): its FLOPs over the call's whole input, whether its input needs a gradient, whether its
    weight is trained, and its output tensor (for gradient reachability; drop it when done)."""
    records: List[Dict[str, Any]] = []

    def hook(layer, inputs, output):
        records.append({"layer": layer.full_name(), "kind": type(layer).__name__,
                        "in": [int(v) for v in inputs[0].shape[1:]], "out": [int(v) for v in output.shape[1:]],
                        "flops": layer_cost(layer, inputs, output),
                        "input_needs_grad": not inputs[0].stop_gradient,
                        "weight_trained": not layer.weight.stop_gradient, "output": output})

    handles = [layer.register_forward_post_hook(hook) for layer in scope.sublayers(include_self=True)
               if isinstance(layer, COUNTED_LAYERS)]
    try:
        result = call()
    finally:
        for handle in handles:
            handle.remove()
    return records, result


def conv_flops(model: nn.Layer, run, image_size: int) -> List[Dict[str, Any]]:
    """Per-layer FLOPs (convolutions, transposed convolutions, linear layers) for one image of
    ``image_size`` when ``run(x)`` is called (in order)."""
    with paddle.no_grad():
        records, _ = count_layers(model, lambda: run(paddle.zeros([1, 3, image_size, image_size])))
    return drop_outputs(records)


def drop_outputs(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``records`` of :func:`count_layers` without their output tensors (done with them)."""
    for record in records:
        record.pop("output", None)
    return records


def model_flops(model, image_size: int) -> Dict[str, Any]:
    """FLOPs per image: expert and cloner forward, and the derived training / gradient costs."""
    expert = conv_flops(model.expert, model.expert, image_size)
    cloner = conv_flops(model.cloner, model.cloner, image_size)
    e_fwd = sum(r["flops"] for r in expert)
    c_fwd = sum(r["flops"] for r in cloner)
    c_first = cloner[0]["flops"] if cloner else 0
    return {
        "image_size": image_size,
        "expert_forward": e_fwd,
        "cloner_forward": c_fwd,
        "score": e_fwd + c_fwd,
        # cached training: cloner forward + weight gradients + data gradients (not into the image)
        "train_cached": 3 * c_fwd - c_first,
        "train_uncached": e_fwd + 3 * c_fwd - c_first,
        # heatmap: both forwards + data gradients of both networks down to the image
        "heatmap": 2 * (e_fwd + c_fwd),
        "expert_convs": len(expert),
        "cloner_convs": len(cloner),
        "expert_layers": expert,
        "cloner_layers": cloner,
    }
