"""Checkpoints: written atomically, loaded with errors that name the file.

Every checkpoint holds ``config`` and names its ``method`` (KDAD checkpoints written before the
method interface have no ``method`` key and are KDAD's). KDAD keeps its cloner under ``cloner``;
the other methods keep their model's state under ``model`` (without the backbone's ImageNet
weights, which are reloaded from their source; with them when the backbone was randomly
initialised).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import paddle

from kdad.config import load_config

FINAL_NAME = "model_final.pdparams"
LATEST_NAME = "checkpoint_latest.pdparams"
RANDOM_EXPERT_NAME = "expert_random_init.pdparams"
_EPOCH_PATTERN = re.compile(r"checkpoint_epoch_(\d+)\.pdparams$")
LOCK_NAME = ".kdad-run.lock"
TMP_PREFIX = ".tmp-"
_TMP_PATTERN = re.compile(r"^\.tmp-(?:(\d+)-)?.*\.pdparams$")  # .tmp-<pid>-<random>.pdparams


def atomic_save(obj: Any, path: str) -> None:
    """``paddle.save`` to a temporary file beside ``path``, then rename it into place. The temporary
    file is named ``.tmp-<pid>-*.pdparams``, so one left by a killed writer can be recognised
    (:func:`clean_stale_temporaries`)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".pdparams", dir=folder)
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


# ----------------------------------------------------------------------------- run folders


class RunFolderError(ValueError):
    """A run folder is busy (another run holds its lock) or holds another run."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def run_files(folder: str) -> List[str]:
    """The names of the files of a run in ``folder`` (final model, checkpoints, random expert)."""
    if not os.path.isdir(folder):
        return []
    names = []
    for name in sorted(os.listdir(folder)):
        if name in (FINAL_NAME, LATEST_NAME, RANDOM_EXPERT_NAME) or _EPOCH_PATTERN.fullmatch(name):
            names.append(name)
    return names


def describe_run_files(names: List[str]) -> str:
    """``model_final.pdparams, checkpoint_latest.pdparams, 3 checkpoint_epoch_*.pdparams (epochs 0..20)``."""
    epochs = sorted(int(m.group(1)) for m in map(_EPOCH_PATTERN.fullmatch, names) if m)
    parts = [n for n in names if not _EPOCH_PATTERN.fullmatch(n)]
    if epochs:
        parts.append(f"{len(epochs)} checkpoint_epoch_*.pdparams (epochs {epochs[0]}..{epochs[-1]})")
    return ", ".join(parts)


def clean_stale_temporaries(folder: str) -> Tuple[int, int]:
    """Delete the ``.tmp-*.pdparams`` files in ``folder`` whose writer is gone (killed during
    :func:`atomic_save`): those naming a process that no longer exists, and unnamed ones of older
    versions. Returns ``(files, bytes)`` deleted. Call it while holding the folder's :class:`RunLock`."""
    count = size = 0
    if not os.path.isdir(folder):
        return 0, 0
    for name in os.listdir(folder):
        match = _TMP_PATTERN.match(name)
        if not match:
            continue
        pid = int(match.group(1)) if match.group(1) else None
        if pid is not None and (pid == os.getpid() or pid_alive(pid)):
            continue  # a live writer's file
        path = os.path.join(folder, name)
        try:
            bytes_ = os.path.getsize(path)
            os.remove(path)
        except OSError:
            continue
        count, size = count + 1, size + bytes_
    return count, size


class RunLock:
    """The lock of a run folder, held for the whole run: ``<folder>/.kdad-run.lock`` holds the
    owner's pid, host, start time and command line.

    On Linux/macOS the file is locked with ``flock``, which the kernel releases when the process
    dies, so a lock left by a killed run (``kill -9``) is taken over (with a warning naming the dead
    pid) and two live runs never both hold it. Without ``fcntl`` the file is created with
    ``O_EXCL`` and a lock naming a dead pid of this host is taken over.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None
        self.created_root: Optional[str] = None  # the topmost folder created by acquire()

    def _record(self) -> bytes:
        import sys

        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "command": " ".join(sys.argv)}).encode()

    @staticmethod
    def _parse(raw: bytes) -> Dict[str, Any]:
        try:
            value = json.loads(raw.decode("utf-8", "replace") or "{}")
            return value if isinstance(value, dict) else {}
        except ValueError:
            return {}

    def _busy(self, holder: Mapping[str, Any]) -> RunFolderError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
               f"{holder.get('command')}" if holder else "unknown process")
        return RunFolderError(
            f"another run is writing to '{self.folder}' ({who}); runs never share a folder: wait for it to "
            f"end or use another --save_dir (if that process is gone, delete '{self.path}')")

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a warning when a dead run's lock was taken over. Raises
        :class:`RunFolderError` when another live run holds it."""
        missing = os.path.abspath(self.folder)
        while not os.path.exists(os.path.dirname(missing)) and os.path.dirname(missing) != missing:
            missing = os.path.dirname(missing)
        self.created_root = None if os.path.exists(missing) else missing
        os.makedirs(self.folder, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self._acquire_exclusive()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._parse(os.pread(fd, 65536, 0))
                os.close(fd)
                raise self._busy(holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner deleted the file between our open and flock
                os.close(fd)
                continue
            previous = self._parse(os.pread(fd, 65536, 0))
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            self._fd = fd
            if previous.get("pid") and previous.get("pid") != os.getpid():
                return (f"took over the lock of an earlier run that ended without releasing it (pid "
                        f"{previous.get('pid')}, started {previous.get('started')}; killed?)")
            return None

    def _acquire_exclusive(self) -> Optional[str]:  # pragma: no cover - Windows
        warning = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                with open(self.path, "rb") as handle:
                    holder = self._parse(handle.read())
                if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", 0))):
                    os.remove(self.path)
                    warning = (f"took over the stale lock of pid {holder.get('pid')} (no longer running, "
                               f"started {holder.get('started')})")
                    continue
                raise self._busy(holder) from None
            os.write(fd, self._record())
            self._fd = fd
            return warning
        raise self._busy({})

    def release(self, remove_created: bool = False) -> None:
        """Delete the lock file and release the lock; with ``remove_created`` also delete the folders
        :meth:`acquire` created, when they are empty."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except (ImportError, OSError):  # pragma: no cover
            pass
        os.close(self._fd)
        self._fd = None
        if remove_created and self.created_root:
            folder = os.path.abspath(self.folder)
            while True:
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                if folder == self.created_root:
                    break
                folder = os.path.dirname(folder)


def remove_run_files(folder: str) -> List[str]:
    """Delete the run files (:func:`run_files`) in ``folder``; returns their names."""
    names = run_files(folder)
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path):  # pragma: no cover - never written by the trainer
            shutil.rmtree(path)
        else:
            os.remove(path)
    return names


def run_id(state: Mapping[str, Any]) -> Optional[str]:
    """The id of the run a checkpoint belongs to (None for checkpoints older than run ids)."""
    run = state.get("run")
    return str(run.get("id")) if isinstance(run, Mapping) and run.get("id") else None


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
    if backbone == "none":  # a method without a backbone (DRAEM): the setting does not apply
        return
    if key in requested and str(requested[key]) != backbone:
        raise ValueError(f"'{path}' holds a {method} model with {key} {backbone}, but {key}="
                         f"{requested[key]} was asked; the networks cannot be exchanged after training")


NETWORK_KEYS = ("expert", "expert_weights", "pretrain", "equal_network_size", "use_bias", "lamda",
                "direction_loss_only", "mvtec_img_size", "method", "backbone", "backbone_pretrained",
                "layers", "feature_dim", "coreset_ratio", "num_neighbors", "draem_width")


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
