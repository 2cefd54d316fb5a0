"""Checkpoints: written atomically, loaded with errors that name the file.

Every checkpoint holds ``config`` and names its ``method`` (KDAD checkpoints written before the
method interface have no ``method`` key and are KDAD's). KDAD keeps its cloner under ``cloner``;
the other methods keep their model's state under ``model`` (without the backbone's ImageNet
weights, which are reloaded from their source; with them when the backbone was randomly
initialised).
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import paddle

from kdad.config import load_config

FINAL_NAME = "model_final.pdparams"
LATEST_NAME = "checkpoint_latest.pdparams"
RANDOM_EXPERT_NAME = "expert_random_init.pdparams"
_EPOCH_PATTERN = re.compile(r"checkpoint_epoch_(\d+)\.pdparams$")


def atomic_save(obj: Any, path: str) -> None:
    """``paddle.save`` to a temporary file beside ``path``, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pdparams", dir=folder)
    os.close(handle)
    try:
        paddle.save(obj, tmp_path)
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch}.pdparams"


def list_epoch_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """``(epoch, path)`` of every periodic checkpoint in ``folder``, by epoch."""
    found = []
    for path in glob.glob(os.path.join(folder, "checkpoint_epoch_*.pdparams")):
        match = _EPOCH_PATTERN.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by the trainer."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file '{path}' does not exist")
    try:
        state = paddle.load(path)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read model file '{path}': {error}") from error
    if not isinstance(state, dict) or "config" not in state or not ("cloner" in state or "model" in state):
        raise ValueError(
            f"'{path}' is not a kdad checkpoint (expected the keys 'config' and 'cloner' or 'model'; "
            "a bare state dict of the cloner, as the old Paddle port saved, cannot say which expert it needs)"
        )
    return state


def checkpoint_method(state: Mapping[str, Any]) -> str:
    """The method a checkpoint was made by (KDAD for checkpoints older than the method interface)."""
    return str(state.get("method") or state["config"].get("method") or "kdad")


def checkpoint_backbone(state: Mapping[str, Any]) -> str:
    """The backbone (KDAD: the expert) a checkpoint's model uses."""
    config = state["config"]
    if checkpoint_method(state) == "kdad":
        return str(config.get("expert", "vgg16"))
    return str(state.get("backbone") or config.get("backbone"))


def check_requested(path: str, state: Mapping[str, Any], requested: Mapping[str, Any]) -> None:
    """Raise a clear error when ``requested`` (values the user gave explicitly) names another method or
    backbone than checkpoint ``path`` holds."""
    method, backbone = checkpoint_method(state), checkpoint_backbone(state)
    if "method" in requested and str(requested["method"]) != method:
        raise ValueError(f"'{path}' holds a {method} model (backbone {backbone}), but method="
                         f"{requested['method']} was asked; use a {requested['method']} checkpoint or "
                         f"drop the method setting (the checkpoint says what it is)")
    key = "expert" if method == "kdad" else "backbone"
    if key in requested and str(requested[key]) != backbone:
        raise ValueError(f"'{path}' holds a {method} model with {key} {backbone}, but {key}="
                         f"{requested[key]} was asked; the networks cannot be exchanged after training")


NETWORK_KEYS = ("expert", "expert_weights", "pretrain", "equal_network_size", "use_bias", "lamda",
                "direction_loss_only", "mvtec_img_size", "method", "backbone", "backbone_pretrained",
                "layers", "feature_dim", "coreset_ratio", "num_neighbors")


def explicit_values(config: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The values of ``config`` the user set explicitly (a :class:`kdad.config.Config` knows them;
    a plain mapping counts as all explicit)."""
    if config is None:
        return {}
    explicit = getattr(config, "explicit", None)
    if explicit is None:
        return config
    return {key: config[key] for key in explicit if key in config}


def load_model(
    path: str, overrides: Optional[Mapping[str, Any]] = None
) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """Rebuild the model of checkpoint ``path`` in eval mode: ``(model, checkpoint, config)``.

    The configuration stored in the checkpoint describes the networks and the input size;
    ``overrides`` may change the other keys only (dataset, evaluation and logging keys). An
    explicitly requested method or backbone that differs from the checkpoint's is an error.
    """
    state = load_checkpoint(path)
    check_requested(path, state, explicit_values(overrides))
    config = dict(state["config"])
    config.setdefault("method", checkpoint_method(state))
    for key, value in (overrides or {}).items():
        if key not in NETWORK_KEYS:
            config[key] = value
    config = load_config(None, config)
    if config["method"] == "kdad":
        return _load_kdad(path, state, config)
    from kdad.registry import get_method

    model = get_method(config["method"]).build_model(config)
    model.load_fitted_state(state["model"], path)
    model.eval()
    return model, state, config


def _load_kdad(path: str, state: Dict[str, Any], config: Dict[str, Any]) -> Tuple[Any, Dict[str, Any],
                                                                                 Dict[str, Any]]:
    from kdad.methods.kdad.model import build_model

    model = build_model(config)
    if not config["pretrain"]:
        expert_path = os.path.join(os.path.dirname(os.path.abspath(path)), RANDOM_EXPERT_NAME)
        if not os.path.isfile(expert_path):
            raise FileNotFoundError(
                f"'{path}' was trained with a random expert (pretrain: False), whose weights must be in "
                f"'{expert_path}' beside it; that file is missing"
            )
        model.expert.set_state_dict(paddle.load(expert_path))
    model.cloner.set_state_dict(state["cloner"])
    model.eval()
    return model, state, config
