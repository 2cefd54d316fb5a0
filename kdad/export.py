"""Export a trained checkpoint to Paddle Inference models, each with a ``deploy.yaml``.

One checkpoint gives up to three static graphs (``paddle.jit.save``: ``model.json`` +
``model.pdiparams``), each in its own folder under ``save_dir``:

* ``score/``: expert + cloner + :meth:`KDADModel.score`; output ``scores [N]``. Forward only: runs
  with oneDNN on or off and converts to ONNX.
* ``heatmap/``: outputs ``(scores [N], sum_c |d sum(scores) / d x| [N, S, S])``. The gradient of
  the *sum* of per-image scores makes each image's map independent of the batch. By default
  (``heatmap_backward="explicit"``) the backward pass is written out with forward ops
  (:mod:`kdad.methods.kdad.explicit_gradient`), so the graph converts to ONNX (onnxruntime runs it about twice
  as fast as Paddle Inference); the export checks it against ``paddle.grad`` in the dynamic graph.
  Paddle Inference runs it with oneDNN off (oneDNN gives wrong maps for it in Paddle 3.3.1).
  ``heatmap_backward="autograd"`` takes the gradient inside the graph with ``paddle.grad``
  instead: that graph holds backward ops, so it does not convert to ONNX (paddle2onnx 2.1.0).
  The Gaussian blur stays outside the graph (:func:`kdad.postprocess.blur`), so the deployed
  map equals :func:`kdad.methods.kdad.localization.raw_maps_from_gradients` of the dynamic model.
* ``feature_map/``: outputs ``(scores [N], feature distance map [N, S, S])``, the forward-only
  map of :mod:`kdad.methods.kdad.feature_maps`; also blurred outside the graph.

The input is ``x``: ``float32 [N, 3, S, S]``, RGB in [0, 1] after an INTER_AREA resize to ``S``
(:func:`kdad.data.io.preprocess`), no mean/std.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

import kdad
from kdad.deploy.config import (
    INPUT_NAME,
    KDAD_KINDS,
    MODEL_FILENAME,
    MODEL_PREFIX,
    PARAMS_FILENAME,
    engine_support,
    read_program_info,
    write_deploy_config,
)
from kdad.methods.kdad.explicit_gradient import ExplicitGradientGraph
from kdad.methods.kdad.feature_maps import feature_distance_map
from kdad.methods.kdad.localization import channel_abs_sum, input_gradients, raw_maps_from_gradients
from kdad.methods.kdad.loss import per_image_distance
from kdad.methods.kdad.model import KDADModel
from kdad.postprocess import blur
from kdad.utils.checkpoint import NETWORK_KEYS, check_requested, explicit_values, load_model

HEATMAP_BACKWARDS = ("explicit", "autograd")


_SCORE = "per-image anomaly score (KDAD distance over the score taps)"
OUTPUTS = {  # (meaning, is a map) per output, in fetch order
    "score": [(_SCORE, False)],
    "heatmap": [(_SCORE, False), ("sum_c |d sum(scores) / d x| (blur outside the graph)", True)],
    "anomaly_map": [("per-image anomaly score of the method", False),
                    ("per-pixel anomaly map of the method (any blur is inside the graph: "
                     "postprocess.blur_in_graph)", True)],
    "feature_map": [(_SCORE, False),
                    ("per-position feature distance (KDAD feature_maps; blur outside the graph)", True)],
}


class ScoreGraph(nn.Layer):
    """``x -> scores [N]``."""

    def __init__(self, model: KDADModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.model.score(x)


class AutogradHeatmapGraph(nn.Layer):
    """``x -> (scores [N], sum_c |d sum(scores) / d x| [N, S, S])`` with ``paddle.grad`` in the graph."""

    def __init__(self, model: KDADModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        x.stop_gradient = False
        scores = self.model.score(x)
        (grad,) = paddle.grad(paddle.sum(scores), x)
        return scores, paddle.sum(paddle.abs(grad), axis=1)


class FeatureMapGraph(nn.Layer):
    """``x -> (scores [N], feature distance map [N, S, S])`` (:mod:`kdad.methods.kdad.feature_maps`)."""

    def __init__(self, model: KDADModel, size: int) -> None:
        super().__init__()
        self.model = model
        self.size = int(size)

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        m = self.model
        cloner_feats, expert_feats = m.features(x)  # one pass for both outputs
        scores = per_image_distance(cloner_feats, expert_feats, m.score_taps, m.lamda, m.direction_only)
        maps = feature_distance_map(cloner_feats, expert_feats, m.score_taps, m.lamda,
                                    m.direction_only, self.size)
        return scores, maps


# --- export ----------------------------------------------------------------------------------


def _graph(kind: str, model: Any, size: int, heatmap_backward: str = "explicit") -> nn.Layer:
    if kind == "anomaly_map":
        return model
    if kind == "score":
        return ScoreGraph(model)
    if kind == "heatmap":
        return ExplicitGradientGraph(model) if heatmap_backward == "explicit" else AutogradHeatmapGraph(model)
    return FeatureMapGraph(model, size)


def compare_outputs(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> Optional[str]:
    """None when every output of ``got`` is within 1e-3 of the maximum of ``want``, else why not."""
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for index, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {index} has shape {list(g.shape)} instead of {list(w.shape)}"
        error = float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-12)
        if error > 1e-3:
            return f"output {index} differs by {error:.2g} of its maximum (tolerance 1e-3)"
    return None


HEATMAP_ONEDNN_NOTE = (
    "forward ops only (hand-written backward, kdad.methods.kdad.explicit_gradient): converts to ONNX; oneDNN "
    "off because Paddle 3.3.1 with oneDNN gives wrong gradient maps for this program (layout "
    "problems, e.g. zero gradients after a max-pool with a 1x1 output)")


def _autograd_reference(model: KDADModel, probe: np.ndarray) -> List[np.ndarray]:
    scores, grads = input_gradients(model, paddle.to_tensor(probe))
    return [scores, channel_abs_sum(grads)]


def held_out_map_statistics(kind: str, model: KDADModel, config: Mapping[str, Any]
                            ) -> Tuple[Optional[Dict], str]:
    """Normal statistics of the deployed (blurred) ``kind`` maps on the trainer's held-out normal images."""
    from kdad.engine.common import dataset, split_train
    from kdad.postprocess import normal_map_statistics

    try:
        _, holdout = split_train(config)
    except (ValueError, FileNotFoundError) as error:
        return None, f"not computed: the training images are not available ({error})"
    if not holdout:
        return None, "not computed: the checkpoint has no held-out normal images (holdout_fraction 0)"
    images = dataset(holdout, config).images()
    size, step = int(config["mvtec_img_size"]), int(config["eval_batch_size"])
    sigma = float(config["blur_sigma"])
    maps = []
    for start in range(0, len(images), step):
        batch = paddle.to_tensor(images[start:start + step])
        if kind == "heatmap":
            maps.append(raw_maps_from_gradients(input_gradients(model, batch)[1], sigma))
            continue
        with paddle.no_grad():
            cloner_feats, expert_feats = model.features(batch)
            raw = feature_distance_map(cloner_feats, expert_feats, model.score_taps, model.lamda,
                                       model.direction_only, size)
        maps.append(blur(raw.numpy(), sigma))
    what = "raw gradient maps" if kind == "heatmap" else "feature maps"
    return (normal_map_statistics(np.concatenate(maps)),
            f"blurred (sigma {sigma:g}) {what} of {len(images)} held-out normal training images, "
            "computed at export")


def _blur_in_graph(model: Any) -> Optional[float]:
    """Sigma of the Gaussian blur inside a method's network (None: its map is not blurred)."""
    from kdad.layers import GaussianBlur2D

    sigmas = [layer.sigma for layer in model.sublayers()
              if isinstance(layer, GaussianBlur2D) and layer.sigma > 0]
    return float(sigmas[0]) if sigmas else None


def _model_info(model: Any, config: Mapping[str, Any]) -> Dict[str, Any]:
    """What the exported network is: the method and its backbone, and the method's settings."""
    if config["method"] == "kdad":
        return {"method": "kdad", "backbone": config["expert"], "expert": config["expert"],
                "pretrain": bool(config["pretrain"]), "score_taps": [int(t) for t in model.score_taps],
                "lamda": float(model.lamda), "direction_only": bool(model.direction_only)}
    from kdad.engine.common import backbone_of

    backbone = getattr(model, "backbone", None)  # DRAEM has none (its describe() says so)
    info = {"method": config["method"], "backbone": backbone_of(config),
            "pretrain": bool(config["backbone_pretrained"]) if backbone is not None else False,
            "layers": list(backbone.taps) if backbone is not None else []}
    describe = getattr(model, "describe", None)
    if callable(describe):
        info.update(describe())
    return info


def _deploy_config(kind: str, model: Any, config: Mapping[str, Any], checkpoint: Mapping[str, Any],
                   model_path: str, engine: Mapping[str, Any],
                   statistics: Tuple[Optional[Dict], str]) -> Dict[str, Any]:
    size = int(config["mvtec_img_size"])
    calibration = checkpoint.get("calibration") or {}
    threshold = calibration.get("threshold")
    return {
        "kind": kind,
        "model": MODEL_FILENAME,
        "params": PARAMS_FILENAME,
        "input": {"name": INPUT_NAME, "shape": [-1, 3, size, size], "dtype": "float32",
                  "layout": "NCHW", "channel_order": "RGB"},
        "transforms": [
            {"type": "Resize", "target_size": [size, size], "interpolation": "INTER_AREA"},
            {"type": "Scale", "divide_by": 255.0, "range": [0.0, 1.0]},
            {"type": "Normalize", "mean": None, "std": None},
        ],
        "outputs": [{"name": f"fetch_name_{i}", "meaning": meaning,
                     "shape": [-1, size, size] if is_map else [-1]}
                    for i, (meaning, is_map) in enumerate(OUTPUTS[kind])],
        "model_info": _model_info(model, config),
        "postprocess": {
            "blur_sigma": float(config["blur_sigma"]) if kind in ("heatmap", "feature_map") else None,
            "blur_in_graph": _blur_in_graph(model) if kind == "anomaly_map" else None,
            "threshold": None if threshold is None else float(threshold),
            "threshold_source": (f"calibration: {calibration.get('holdout_images')} held-out normal "
                                 f"images, false reject rate {calibration.get('false_reject_rate')}"
                                 if threshold is not None else "none in the checkpoint: pass --threshold"),
            "heatmap_statistics": statistics[0] if kind != "score" else None,
            "heatmap_statistics_source": statistics[1] if kind != "score" else None,
            "ng_rule": "score > threshold",
        },
        "engine": dict(engine),
        "source": {"checkpoint": os.path.abspath(model_path), "epoch": checkpoint.get("epoch"),
                   "kdad_version": kdad.__version__, "paddle_version": paddle.__version__},
    }


def probe_onednn(model_file: str, params_file: str, probe: np.ndarray,
                 expected: Sequence[np.ndarray]) -> Tuple[bool, str]:
    """Run the saved model on ``probe`` in Paddle Inference with oneDNN on; compare to ``expected``."""
    from kdad.deploy.runtime import PredictorOptions, create_paddle_predictor

    try:
        runner = create_paddle_predictor(model_file, params_file,
                                         PredictorOptions(enable_mkldnn=True, cpu_threads=1))
        outputs = runner.run(probe)
    except Exception as error:  # noqa: BLE001 - any failure means "does not work with oneDNN"
        return False, f"failed with oneDNN: {str(error).strip().splitlines()[-1][:200]}"
    problem = compare_outputs(outputs, expected)
    if problem:
        return False, f"oneDNN output differs from the dynamic graph: {problem}"
    return True, "checked at export: oneDNN output matches the dynamic graph"


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _checked_graph(kind: str, model: Any, size: int, heatmap_backward: Optional[str],
                   probe: Optional[np.ndarray]) -> Tuple[nn.Layer, Optional[List[np.ndarray]]]:
    """The graph of ``kind`` in eval mode and its dynamic-graph outputs on ``probe`` (the reference
    the saved model is checked against). An explicit-backward heatmap graph must equal ``paddle.grad``
    on the probe (max difference 1e-3 of the map's maximum); otherwise, or when the networks have a
    layer without a hand-written backward, the autograd graph is exported instead, with a warning."""
    if kind == "heatmap" and heatmap_backward == "explicit":
        try:
            graph = _graph(kind, model, size, "explicit")
        except (TypeError, ValueError) as error:
            _warn(f"heatmap: no hand-written backward ({error}); exporting the paddle.grad graph "
                  "(Paddle Inference with oneDNN off only, no ONNX)")
            return _checked_graph(kind, model, size, "autograd", probe)
        graph.eval()
        if probe is None:
            return graph, None
        reference = _autograd_reference(model, probe)
        with paddle.no_grad():
            outputs = [t.numpy() for t in graph(paddle.to_tensor(probe))]
        errors = [float(np.abs(o - r).max()) / max(float(np.abs(r).max()), 1e-12)
                  for o, r in zip(outputs, reference)]
        if max(errors) > 1e-3:
            _warn(f"heatmap: the hand-written backward differs from paddle.grad by {max(errors):.2g} "
                  "(relative); exporting the paddle.grad graph (oneDNN off only, no ONNX)")
            return _checked_graph(kind, model, size, "autograd", probe)
        return graph, reference
    graph = _graph(kind, model, size, heatmap_backward or "explicit")
    graph.eval()
    if probe is None or kind == "heatmap":  # the autograd graph is checked in Paddle Inference by tests
        return graph, None
    with paddle.no_grad():  # dygraph reference, before to_static converts forward
        out = graph(paddle.to_tensor(probe))
    return graph, [t.numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]


EXPORT_KINDS = tuple(KDAD_KINDS) + ("anomaly_map",)


def exported_folders(save_dir: str) -> List[str]:
    """The exported model folders (``<kind>/`` with a model or deploy.yaml) in ``save_dir``."""
    found = []
    for kind in EXPORT_KINDS:
        folder = os.path.join(save_dir, kind)
        if os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, name))
                                         for name in (MODEL_FILENAME, PARAMS_FILENAME, "deploy.yaml")):
            found.append(kind)
    return found


def prepare_export_dir(save_dir: str, overwrite: bool = False) -> None:
    """Check ``save_dir`` before exporting: it must be a folder (or not exist) and hold no exported
    model folder of another export, unless ``overwrite``, which deletes them all (also kinds not
    exported now, so no deploy.yaml of another checkpoint stays beside the new ones)."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ValueError(f"--save_dir '{save_dir}' exists and is not a folder; name a folder for the "
                         "exported models")
    existing = exported_folders(save_dir)
    if not existing:
        return
    if not overwrite:
        listed = ", ".join(kind + "/" for kind in existing)
        raise ValueError(f"'{save_dir}' already holds exported models ({listed}); an export never mixes with "
                         "another one: choose another --save_dir or replace them with --overwrite")
    import shutil

    for kind in existing:
        shutil.rmtree(os.path.join(save_dir, kind))
    _warn(f"--overwrite: deleted the earlier exported models in '{save_dir}' "
          f"({', '.join(k + '/' for k in existing)})")


def default_kinds(method: str) -> Tuple[str, ...]:
    """The graphs a method exports: KDAD's three kinds, one ``anomaly_map`` graph for the others."""
    return KDAD_KINDS if method == "kdad" else ("anomaly_map",)


def export_model(model_path: str, save_dir: str, overrides: Optional[Mapping[str, Any]] = None,
                 kinds: Optional[Sequence[str]] = None, probe: bool = True,
                 expected_config: Optional[Mapping[str, Any]] = None,
                 heatmap_backward: str = "explicit", overwrite: bool = False) -> Dict[str, str]:
    """Export ``kinds`` of checkpoint ``model_path`` to ``<save_dir>/<kind>/``; returns kind -> folder.

    ``save_dir`` must not hold models of another export (:func:`prepare_export_dir`): with
    ``overwrite`` every exported model folder in it is deleted first, so an export never mixes with
    another one.

    The networks, input size and everything else come from the checkpoint's config; ``overrides``
    may change non-network keys (e.g. ``dataset_root``, used for the feature-map statistics).
    Network keys of ``overrides`` or ``expected_config`` (e.g. a ``--config`` file) that differ
    from the checkpoint are reported and ignored.
    """
    if heatmap_backward not in HEATMAP_BACKWARDS:
        raise ValueError(f"unknown heatmap_backward {heatmap_backward!r}; choose from {HEATMAP_BACKWARDS}")
    prepare_export_dir(save_dir, overwrite)
    model, checkpoint, config = load_model(model_path, overrides)
    check_requested(model_path, checkpoint, explicit_values(expected_config))
    allowed = default_kinds(config["method"])
    kinds = list(kinds) if kinds else list(allowed)
    unknown = [kind for kind in kinds if kind not in allowed]
    if unknown:
        raise ValueError(f"model kind(s) {unknown} do not exist for the {config['method']} model of "
                         f"'{model_path}'; choose from {list(allowed)}")
    requested = {**dict(expected_config or {}), **dict(overrides or {})}
    for key in NETWORK_KEYS:
        if key in requested and key != "expert_weights" and requested[key] != config.get(key):
            _warn(f"ignoring {key}={requested[key]!r}: checkpoint '{model_path}' was trained with "
                  f"{key}={config.get(key)!r}, which the exported models use")
    for param in model.parameters():
        param.stop_gradient = True  # only d/dx is ever needed
    size = int(config["mvtec_img_size"])
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", name=INPUT_NAME)]
    probe_input = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    calibration = checkpoint.get("calibration") or {}
    written: Dict[str, str] = {}
    for kind in kinds:
        folder = os.path.join(save_dir, kind)
        os.makedirs(folder, exist_ok=True)
        backward = heatmap_backward if kind == "heatmap" else None
        graph, expected = _checked_graph(kind, model, size, backward, probe_input if probe else None)
        if isinstance(graph, AutogradHeatmapGraph):
            backward, expected = "autograd", None
        static = paddle.jit.to_static(graph, input_spec=spec, full_graph=True)
        paddle.jit.save(static, os.path.join(folder, MODEL_PREFIX))
        model_file = os.path.join(folder, MODEL_FILENAME)
        info = read_program_info(model_file) or {"ops": set()}
        engine = engine_support(info["ops"])
        if backward == "explicit":
            engine["onednn"], engine["note"] = False, HEATMAP_ONEDNN_NOTE
            # onnxruntime's layout optimisations (level "all": NCHWc convolutions) round differently, and a
            # ReLU mask of the hand-written backward can flip on an activation within rounding of 0:
            # a visibly different map region. "extended" keeps the dynamic model's maps (tests/test_deploy.py)
            engine["onnx_optimization"] = "extended"
        elif expected is not None and engine["onednn"]:
            engine["onednn"], engine["onednn_check"] = probe_onednn(
                model_file, os.path.join(folder, PARAMS_FILENAME), probe_input, expected)
        same_blur = float(checkpoint["config"].get("blur_sigma", -1)) == float(config["blur_sigma"])
        if kind == "anomaly_map":
            statistics = (calibration.get("map_statistics"), "calibration of the checkpoint: the model's "
                          "maps of held-out normal training images")
        elif kind == "heatmap" and calibration.get("map_statistics") and same_blur:
            statistics = (calibration["map_statistics"], "calibration of the checkpoint: blurred raw "
                          "gradient maps of held-out normal training images")
        elif kind != "score":
            statistics = held_out_map_statistics(kind, model, config)
        else:
            statistics = (None, "")
        deploy = _deploy_config(kind, model, config, checkpoint, model_path, engine, statistics)
        if backward:
            deploy["model_info"]["heatmap_backward"] = (
                "explicit: hand-written backward with forward ops (methods.kdad.explicit_gradient), checked "
                "against paddle.grad at export" if backward == "explicit"
                else "autograd: paddle.grad in the graph")
        write_deploy_config(folder, deploy)
        print(f"exported the {kind} model to {folder} (oneDNN: {engine['onednn']}, ONNX: {engine['onnx']})",
              flush=True)
        written[kind] = folder
    return written
