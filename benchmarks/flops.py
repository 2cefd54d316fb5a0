"""FLOPs per image of the expert and the cloner, counted on the real layers with forward hooks.

A convolution costs ``2 * C_out * H_out * W_out * (C_in / groups) * k_h * k_w`` FLOPs (one multiply
and one add per MAC); BatchNorm, activations, pooling and the distance are left out (well under 1%
here). The counts cover what scoring runs: every layer up to the last tap (``run_taps`` stops
there). Training and gradient costs are derived from the forward counts:

* the data gradient of a conv costs as much as its forward (a transposed conv), except the first
  conv of a network, whose input gradient is only needed for heatmaps;
* the weight gradient of a conv costs as much as its forward.
"""

from __future__ import annotations

from typing import Any, Dict, List

import paddle
import paddle.nn as nn


def conv_flops(model: nn.Layer, run, image_size: int) -> List[Dict[str, Any]]:
    """Per-conv FLOPs for one image of ``image_size`` when ``run(x)`` is called (in order)."""
    records: List[Dict[str, Any]] = []

    def hook(layer, inputs, output):
        weight = layer.weight
        c_out, c_in_per_group, k_h, k_w = [int(v) for v in weight.shape]
        n, _, h_out, w_out = [int(v) for v in output.shape]
        flops = 2 * c_out * h_out * w_out * c_in_per_group * k_h * k_w
        records.append({"layer": layer.full_name(), "in": [int(v) for v in inputs[0].shape[1:]],
                        "out": [c_out, h_out, w_out], "flops": flops})

    handles = [layer.register_forward_post_hook(hook) for layer in model.sublayers()
               if isinstance(layer, nn.Conv2D)]
    try:
        with paddle.no_grad():
            run(paddle.zeros([1, 3, image_size, image_size]))
    finally:
        for handle in handles:
            handle.remove()
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
