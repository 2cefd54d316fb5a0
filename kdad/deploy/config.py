"""The deploy config (``deploy.yaml``) and exported-program facts, shared by export and the runtime.

Imports no training code: the deploy runtime (:mod:`kdad.deploy.runtime`) builds on it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Set

import yaml

# KDAD exports up to three graphs; every other method one ``anomaly_map`` graph (its whole scorer:
# image in, score and blurred map out).
KDAD_KINDS = ("score", "heatmap", "feature_map")
MODEL_KINDS = KDAD_KINDS + ("anomaly_map",)
MAP_KINDS = ("heatmap", "feature_map", "anomaly_map")
MODEL_PREFIX = "model"
MODEL_FILENAME = MODEL_PREFIX + ".json"
PARAMS_FILENAME = MODEL_PREFIX + ".pdiparams"
DEPLOY_FILENAME = "deploy.yaml"
INPUT_NAME = "x"

# --- reading exported programs ----------------------------------------------------------------


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def read_program_info(model_file: str) -> Optional[Dict[str, Any]]:
    """``{"inputs": {name: shape}, "ops": set of op names}`` of a PIR ``.json`` program.

    Returns None for a legacy ``.pdmodel`` (protobuf) or an unparsable file.
    """
    if not model_file.endswith(".json"):
        return None
    try:
        with open(model_file, encoding="utf-8") as handle:
            program = json.load(handle)
    except (OSError, ValueError):
        return None
    inputs: Dict[str, List[int]] = {}
    ops: Set[str] = set()
    for node in _walk(program.get("program", {})):
        op = node.get("#")
        if not isinstance(op, str) or "A" not in node:
            continue
        ops.add(op.split(".", 1)[-1])
        if op.endswith(".data"):
            attrs = {a.get("N"): a.get("AT", {}).get("D") for a in node["A"] if isinstance(a, dict)}
            if isinstance(attrs.get("name"), str) and isinstance(attrs.get("shape"), list):
                inputs[attrs["name"]] = [int(v) for v in attrs["shape"]]
    return {"inputs": inputs, "ops": ops}


def engine_support(ops: Set[str]) -> Dict[str, Any]:
    """Which engines a program can use, from its ops (facts verified on Paddle 3.3.1)."""
    grad_ops = sorted(op for op in ops if op.endswith("_grad"))
    interp_ops = sorted(op for op in ops if "interp" in op)
    notes = []
    if grad_ops:
        notes.append("contains backward ops (input gradient): oneDNN fails on pool2d_grad in Paddle "
                     "3.3.1 and paddle2onnx 2.1.0 aborts on *_grad ops")
    if interp_ops:
        notes.append("contains interpolation ops, which fail under oneDNN in Paddle 3.3.1 (#77340)")
    return {"onednn": not grad_ops and not interp_ops, "onnx": not grad_ops,
            "note": "; ".join(notes) or "forward only"}


def load_deploy_config(folder: str) -> Dict[str, Any]:
    """The ``Deploy`` mapping of ``<folder>/deploy.yaml`` (clear errors when missing or invalid)."""
    path = os.path.join(folder, DEPLOY_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"'{path}' not found: every exported model folder holds a deploy.yaml (input size, "
            "threshold, heatmap statistics); export the checkpoint with tools/export_model.py")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ValueError(f"'{path}' is not valid YAML: {error}") from error
    deploy = data.get("Deploy") if isinstance(data, dict) else None
    required = ("kind", "input", "postprocess", "engine")
    if not isinstance(deploy, dict) or any(key not in deploy for key in required):
        raise ValueError(f"'{path}' is not a kdad deploy config (expected 'Deploy:' with {required})")
    if deploy["kind"] not in MODEL_KINDS:
        raise ValueError(f"'{path}': unknown model kind {deploy['kind']!r} (expected one of {MODEL_KINDS})")
    return deploy


class _Dumper(yaml.SafeDumper):
    """Block style, except lists of scalars (shapes, taps) on one line."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(value is None or isinstance(value, (bool, int, float, str)) for value in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def write_deploy_config(folder: str, deploy: Mapping[str, Any]) -> str:
    path = os.path.join(folder, DEPLOY_FILENAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("# kdad deploy config (PaddleSeg style); written by kdad.export\n")
        yaml.dump({"Deploy": dict(deploy)}, handle, Dumper=_Dumper, sort_keys=False, width=100)
    return path


def input_size(deploy: Mapping[str, Any]) -> int:
    """The square input size ``S`` of a deploy config."""
    shape = deploy["input"]["shape"]
    return int(shape[-1])
