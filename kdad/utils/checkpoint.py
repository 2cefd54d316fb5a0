"""Checkpoints: written atomically, loaded with errors that name the file."""

from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import paddle

from kdad.config import load_config
from kdad.methods.kdad.model import KDADModel, build_model

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
    if not isinstance(state, dict) or "cloner" not in state or "config" not in state:
        raise ValueError(
            f"'{path}' is not a kdad checkpoint (expected the keys 'cloner' and 'config'; "
            "a bare state dict of the cloner, as the old Paddle port saved, cannot say which expert it needs)"
        )
    return state


NETWORK_KEYS = ("expert", "expert_weights", "pretrain", "equal_network_size", "use_bias", "lamda",
                "direction_loss_only", "mvtec_img_size")


def load_model(
    path: str, overrides: Optional[Mapping[str, Any]] = None
) -> Tuple[KDADModel, Dict[str, Any], Dict[str, Any]]:
    """Rebuild the model of checkpoint ``path`` in eval mode: ``(model, checkpoint, config)``.

    The configuration stored in the checkpoint describes the networks and the input size;
    ``overrides`` may change the other keys only (dataset, evaluation and logging keys).
    """
    state = load_checkpoint(path)
    config = dict(state["config"])
    for key, value in (overrides or {}).items():
        if key not in NETWORK_KEYS:
            config[key] = value
    config = load_config(None, config)
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
