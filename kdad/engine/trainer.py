"""Training loop: cached teacher features, atomic resumable checkpoints, data parallel, calibration.

A trained method (KDAD, STFPM, RD4AD) gives a :class:`kdad.methods.base.TrainingSpec` (student,
frozen teacher features, loss, optimiser) and runs in one epoch loop: seeded shuffles that depend on
the epoch only (stopped and resumed = uninterrupted), the teacher's features cached when no random
augmentation applies, a checkpoint every ``save_every`` epochs, the final epoch's model (never one
chosen on the test set), calibration on held-out normal images. Training-free methods (PaDiM,
PatchCore) fit in one pass (:func:`fit_method`).

Every run (a method's epochs or one-pass fit) owns its class folder for its whole
duration (:class:`_RunFolder`): a lock against concurrent runs, no start over another run's files
unless ``overwrite`` (or ``continue_train`` of that run), stale temporary files of killed writers
removed. A non-finite loss stops training with a clear error and no final model; Ctrl-C ends in
:class:`TrainingInterrupted`, which says whether the run can be resumed.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist

from kdad.config import Config, dump_config
from kdad.engine.common import (
    backbone_of,
    class_dir,
    class_name,
    compare_split,
    dataset,
    log_path,
    predict_maps,
    seed_everything,
    set_cpu_threads,
    split_record,
    split_train,
)
from kdad.methods.base import TrainingSpec
from kdad.methods.kdad.localization import localization_maps
from kdad.methods.kdad.model import KDADModel, check_taps_match
from kdad.postprocess import normal_map_statistics, threshold_from_normal_scores
from kdad.utils.checkpoint import (
    FINAL_NAME,
    LATEST_NAME,
    RANDOM_EXPERT_NAME,
    RunFolderError,
    RunLock,
    atomic_save,
    clean_stale_temporaries,
    describe_run_files,
    epoch_checkpoint_name,
    explicit_values,
    load_checkpoint,
    remove_run_files,
    run_files,
)
from kdad.utils.distributed import all_finite, broadcast_parameters
from kdad.utils.logger import get_logger


def _world() -> tuple:
    world_size = dist.get_world_size()
    if world_size > 1 and not dist.is_initialized():
        dist.init_parallel_env()
    return dist.get_rank(), world_size


def cache_teacher_features(training: TrainingSpec, model: Any, images: np.ndarray,
                           batch_size: int) -> Dict[Any, np.ndarray]:
    """The frozen teacher's (KDAD: the expert's) training features of every image, computed once."""
    chunks: Dict[Any, List[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        feats = training.teacher_features(model, paddle.to_tensor(images[start:start + batch_size]))
        for key, value in feats.items():
            chunks.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def cache_expert_features(model: KDADModel, images: np.ndarray, batch_size: int) -> Dict[int, np.ndarray]:
    """KDAD's expert loss-tap activations for every training image (:func:`cache_teacher_features`)."""
    from kdad.methods.kdad.train import TRAINING

    return cache_teacher_features(TRAINING, model, images, batch_size)


# Calibration: below ``min_calibration_images`` held-out images no threshold is stored; below
# RECOMMENDED_CALIBRATION_IMAGES training warns that the threshold is unreliable.
RECOMMENDED_CALIBRATION_IMAGES = 5


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite: training stopped, no final model written."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``resumable`` when a checkpoint of the run is kept (resume it with
    ``continue_train``)."""

    def __init__(self, message: str, resumable: bool) -> None:
        super().__init__(message)
        self.resumable = resumable


def calibration_plan(n_holdout: int, n_normal: int, config: Mapping[str, Any]) -> Tuple[bool, str]:
    """``(threshold possible, what the held-out images mean for the threshold)``."""
    floor = int(config.get("min_calibration_images", 2))
    rate = float(config["false_reject_rate"])
    if n_holdout < floor:
        if float(config["holdout_fraction"]) == 0:
            why = "holdout_fraction is 0: no normal image is held out for calibration"
        else:
            why = (f"only {n_holdout} of the {n_normal} normal training images "
                   f"{'is' if n_holdout == 1 else 'are'} held out for calibration (holdout_fraction "
                   f"{float(config['holdout_fraction']):g})")
        return False, (f"{why}; a threshold needs at least {floor} (min_calibration_images), so no OK/NG "
                       "threshold is stored: predict.py and infer.py need --threshold T (more normal images "
                       "or a larger holdout_fraction give one)")
    if n_holdout * rate < 1:
        return True, (f"the threshold is the highest score of the {n_holdout} held-out normal images: "
                      f"about 1 in {n_holdout + 1} normal images ({100.0 / (n_holdout + 1):.0f}%) will "
                      f"score above it, not the false_reject_rate {rate:g}, which needs "
                      f"{math.ceil(1 / rate)} held-out images")
    return True, f"the threshold is the {1 - rate:g} quantile of {n_holdout} held-out normal scores"


def _check_finite_scores(scores: np.ndarray) -> None:
    if not np.isfinite(scores).all():
        raise TrainingDiverged(
            f"the model's scores of {int((~np.isfinite(scores)).sum())} held-out normal image(s) are not "
            "finite (NaN or infinite weights or features): no threshold can be calibrated, no final model "
            "is written")


def _calibration(scores: np.ndarray, maps: np.ndarray, n_normal: int,
                 config: Mapping[str, Any]) -> Dict[str, Any]:
    n = int(len(scores))
    possible, note = calibration_plan(n, n_normal, config)
    if n == 0:
        return {"threshold": None, "holdout_images": 0, "note": note}
    _check_finite_scores(scores)
    rate = float(config["false_reject_rate"])
    return {
        "threshold": threshold_from_normal_scores(scores, rate) if possible else None,
        "false_reject_rate": rate,
        "holdout_images": n,
        "note": note,
        "holdout_score_mean": float(scores.mean()),
        "holdout_score_std": float(scores.std()),
        "holdout_score_max": float(scores.max()),
        "map_statistics": normal_map_statistics(maps),
    }


def calibrate(model: KDADModel, holdout_images: np.ndarray, config: Mapping[str, Any],
              n_normal: Optional[int] = None) -> Dict[str, Any]:
    """OK/NG threshold and heatmap scale from held-out normal training images (never the test set);
    no threshold below ``min_calibration_images`` held-out images."""
    n_normal = len(holdout_images) if n_normal is None else n_normal
    if len(holdout_images) == 0:
        return _calibration(np.zeros(0), np.zeros(0), n_normal, config)
    scores, raw_maps = [], []
    for start in range(0, len(holdout_images), int(config["eval_batch_size"])):
        batch = paddle.to_tensor(holdout_images[start:start + int(config["eval_batch_size"])])
        batch_scores, _, raw = localization_maps(model, batch, "gradients", float(config["blur_sigma"]))
        scores.append(batch_scores)  # the score pass that gives the gradients: one pass per image
        raw_maps.append(raw)
    return _calibration(np.concatenate(scores), np.concatenate(raw_maps), n_normal, config)


def calibrate_maps(model: Any, holdout_images: np.ndarray, config: Mapping[str, Any],
                   n_normal: Optional[int] = None) -> Dict[str, Any]:
    """OK/NG threshold and map scale of a method's model from held-out normal training images."""
    n_normal = len(holdout_images) if n_normal is None else n_normal
    if len(holdout_images) == 0:
        return _calibration(np.zeros(0), np.zeros(0), n_normal, config)
    scores, maps = predict_maps(model, holdout_images, int(config["eval_batch_size"]))
    return _calibration(scores, maps, n_normal, config)


# ----------------------------------------------------------------------------- the run folder


class _RunFolder:
    """Rank 0's hold on a run's class folder for the whole run: its lock, the refusal to start over
    another run's files (unless ``overwrite``, which deletes them first, or ``continue_train`` of
    that run), stale temporary files of killed writers removed, and the cleanup of a fresh run
    that ends (error, divergence, Ctrl-C) before its first checkpoint."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.folder = class_dir(config)
        self.lock = RunLock(self.folder)
        self.fresh = not config["continue_train"]
        self.notes: List[str] = []  # logged once the log is open
        self.created: List[str] = []  # files written before the first checkpoint
        self.checkpoint: Optional[Tuple[int, str]] = None  # (epoch, path) of the run's last checkpoint

    def open(self) -> None:
        taken_over = self.lock.acquire()
        if taken_over:
            self.notes.append(f"WARNING: {taken_over}")
        try:
            existing = run_files(self.folder)
            if self.fresh and existing:
                if not self.config["overwrite"]:
                    resume = ("resume it with -o continue_train=True, " if self.config["method"] == "kdad"
                              else "")
                    raise RunFolderError(
                        f"'{self.folder}' already holds a run ({describe_run_files(existing)}); a new run "
                        f"would overwrite it and mix with its checkpoints: {resume}train into another "
                        "--save_dir, or replace it with -o overwrite=True")
                remove_run_files(self.folder)
                self.notes.append(f"overwrite=True: deleted the earlier run in '{self.folder}' "
                                  f"({describe_run_files(existing)})")
            count, size = clean_stale_temporaries(self.folder)
            if count:
                self.notes.append(f"deleted {count} temporary file(s) ({size / 2 ** 20:.1f} MB) left by "
                                  f"killed writers in '{self.folder}'")
        except BaseException:
            self.lock.release(remove_created=True)
            raise

    def close(self, ok: bool) -> None:
        discard = not ok and self.fresh and self.checkpoint is None
        if discard:
            for path in self.created:
                if os.path.isfile(path):
                    os.remove(path)
        self.lock.release(remove_created=not ok)  # folders this run created, if left empty

    def interrupted(self) -> TrainingInterrupted:
        if self.checkpoint is not None:
            epoch, path = self.checkpoint
            return TrainingInterrupted(
                f"interrupted; the run's last checkpoint '{path}' (epoch {epoch}) is kept", True)
        if not self.fresh:
            return TrainingInterrupted("interrupted; the run's checkpoint_latest is unchanged", True)
        return TrainingInterrupted("interrupted before the first checkpoint: nothing was kept; run the same "
                                   "command again", False)


def _in_run(config: Mapping[str, Any], body: Callable[[Optional[_RunFolder]], Any], rank: int = 0,
            world_size: int = 1) -> Any:
    """Run ``body`` holding the class folder (rank 0 only; the other ranks learn whether it
    could be opened)."""
    split_train(config)  # a missing or empty dataset is reported before any file is written
    run: Optional[_RunFolder] = None
    error: Optional[BaseException] = None
    if rank == 0:
        run = _RunFolder(config)
        try:
            run.open()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
    if world_size > 1:
        failed = paddle.to_tensor([0.0 if error is None else 1.0], dtype="float32")
        dist.broadcast(failed, src=0)
        if error is None and float(failed.numpy().ravel()[0]) > 0:
            raise RunFolderError("rank 0 could not start the run (see its log)")
    if error is not None:
        raise error
    ok = False
    try:
        result = body(run)
        ok = True
        return result
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        raise (run.interrupted() if run is not None else TrainingInterrupted("interrupted", False)) from None
    finally:
        if run is not None:
            run.close(ok)


# Keys every resumed run must share with its checkpoint (the network, the data split and the
# optimisation); a method's TrainingSpec.resume_keys adds its own (KDAD: the expert and the cloner).
# num_epochs, save_every, logging and evaluation keys may change.
RESUME_KEYS = ("method", "mvtec_img_size", "learning_rate", "batch_size", "seed", "holdout_fraction",
               "test_fraction", "dataset_name", "normal_class", "good_dir", "defect_dir")
#: what the methods other than KDAD add: their backbone (teacher) and its taps
BACKBONE_RESUME_KEYS = ("backbone", "backbone_pretrained", "backbone_weights", "layers")


def resume_keys(config: Mapping[str, Any]) -> Tuple[str, ...]:
    """:data:`RESUME_KEYS` and the method's own."""
    from kdad.registry import get_method

    training = get_method(config["method"]).training
    own = training.resume_keys if training is not None else ()
    backbone = () if config["method"] == "kdad" else BACKBONE_RESUME_KEYS
    return RESUME_KEYS + tuple(key for key in (*own, *backbone) if key not in RESUME_KEYS)


def resume_config(config: Mapping[str, Any], state: Mapping[str, Any], path: str
                  ) -> Tuple[Dict[str, Any], List[str]]:
    """The configuration of a resumed run: a key of :func:`resume_keys` set explicitly to another value
    than checkpoint ``path`` holds is an error naming every such key; one left at its default takes
    the checkpoint's value (returned as a warning)."""
    trained = state["config"]
    explicit = explicit_values(config)
    conflicts, adopted = [], []
    folder_keys = ("test_fraction", "good_dir", "defect_dir")  # they matter for the folder dataset only
    folder = "folder" in (config["dataset_name"], trained.get("dataset_name"))
    for key in resume_keys(config):
        if key not in trained or config[key] == trained[key]:
            continue
        if key in folder_keys and not folder:
            continue
        if key in explicit:
            conflicts.append(f"{key} (checkpoint {trained[key]!r}, now {config[key]!r})")
        else:
            adopted.append(key)
    if conflicts:
        raise ValueError(
            f"continue_train: '{path}' was trained with other settings: {', '.join(conflicts)}; resume with "
            "the checkpoint's values (drop these settings) or start a new run (-o overwrite=True or another "
            "--save_dir)")
    notes = []
    if (config["method"] == "kdad" and config.get("pretrain")
            and trained.get("expert_weights") not in (None, config["expert_weights"])):
        notes.append(f"WARNING: continue_train: the expert weights are read from "
                     f"'{config['expert_weights']}', the checkpoint was trained with "
                     f"'{trained['expert_weights']}': they must be the same weights")
    if not adopted:
        return dict(config) if not isinstance(config, Config) else config, notes
    merged = Config({**config, **{key: trained[key] for key in adopted}})
    merged.explicit = getattr(config, "explicit", frozenset(config))
    notes.append("WARNING: continue_train: using the checkpoint's " + ", ".join(
        f"{key}={trained[key]!r}" for key in adopted) + " (not set for this run; the defaults differ)")
    return merged, notes


def _read_split(config: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """``(train images, held-out images, split record)``; every unreadable file reported at once."""
    train_samples, holdout_samples = split_train(config)
    images = dataset(train_samples + holdout_samples, config).images()
    return (images[:len(train_samples)], images[len(train_samples):],
            split_record(config, train_samples, holdout_samples))


def _log_calibration_plan(log: Any, n_holdout: int, n_normal: int, config: Mapping[str, Any]) -> None:
    possible, note = calibration_plan(n_holdout, n_normal, config)
    if not possible or n_holdout < RECOMMENDED_CALIBRATION_IMAGES:
        log.info(f"WARNING: {note}")
    else:
        log.info(f"calibration: {note}")


def _log_calibration(log: Any, calibration: Mapping[str, Any]) -> None:
    if calibration["threshold"] is None:
        log.info(f"WARNING: calibration on {calibration['holdout_images']} held-out normal images: no "
                 f"threshold ({calibration['note']})")
    else:
        log.info(f"calibration on {calibration['holdout_images']} held-out normal images: threshold "
                 f"{calibration['threshold']}")


def _new_run_info() -> Dict[str, str]:
    return {"id": uuid.uuid4().hex[:12], "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def fit_method(config: Dict[str, Any], return_model: bool = False):
    """Fit a training-free method (PaDiM, PatchCore) on the normal training images of ``config``,
    calibrate on the held-out ones and write ``model_final.pdparams``; returns its path."""
    if dist.get_world_size() > 1:
        raise ValueError(f"{config['method']} fits in one pass in one process; run tools/train.py without "
                         "paddle.distributed.launch (data parallelism applies to trained methods)")
    if config["continue_train"]:
        raise ValueError(f"{config['method']} is fitted in one pass: there is nothing to resume "
                         "(continue_train); refit with -o overwrite=True")
    return _in_run(config, lambda run: _fit(config, run, return_model))


def _fit(config: Dict[str, Any], run: Optional[_RunFolder], return_model: bool):
    from kdad.registry import get_method

    spec = get_method(config["method"])
    seed_everything(int(config["seed"]))
    threads = set_cpu_threads(int(config["cpu_threads"]))
    out_dir = class_dir(config)
    name = class_name(config)
    log = get_logger(f"fit.{config['method']}.{name}", log_path(config, "train"), console=True)
    for note in run.notes if run else []:
        log.info(note)
    t0 = time.time()
    train_images, holdout_images, record = _read_split(config)
    n_normal = len(train_images) + len(holdout_images)
    log.info(f"method {config['method']}, class {name}: {len(train_images)} training images, "
             f"{len(holdout_images)} held out for calibration (seed {config['seed']}); backbone "
             f"{config['backbone']} (pretrained={config['backbone_pretrained']}), "
             f"{config['mvtec_img_size']} px, {threads} CPU threads; images read in {time.time() - t0:.1f}s")
    _log_calibration_plan(log, len(holdout_images), n_normal, config)
    log.info("config:\n" + dump_config(config))
    model = spec.build_model(config)
    t0 = time.time()
    facts = spec.fit(model, train_images, config, log.info)  # methods log through a plain callable
    fit_seconds = time.time() - t0
    log.info(f"fitted in {fit_seconds:.1f}s: {facts}")
    model.eval()
    calibration = calibrate_maps(model, holdout_images, config, n_normal)
    _log_calibration(log, calibration)
    final = os.path.join(out_dir, FINAL_NAME)
    atomic_save({"method": config["method"], "backbone": backbone_of(config), "epoch": 0,
                 "model": model.checkpoint_state(include_backbone=not config["backbone_pretrained"]),
                 "config": dict(config), "calibration": calibration, "run": _new_run_info(), "split": record,
                 "fit": {**facts, "fit_seconds": round(fit_seconds, 2)}}, final)
    log.info(f"saved {final}")
    return (final, model) if return_model else final


def train(config: Dict[str, Any], return_model: bool = False):
    """Train (KDAD, STFPM, RD4AD: epochs of the method's :class:`TrainingSpec`) or fit (PaDiM,
    PatchCore) the model of ``config``; returns the final checkpoint path (rank 0) or None.

    With ``return_model`` returns ``(path_or_None, model)`` (every rank; used by tests).
    Parameter names (which key the optimizer state) are generated afresh, so resuming works in a
    process that has built other layers before. Raises :class:`kdad.utils.checkpoint.RunFolderError`
    when the class folder holds another run or another run is writing to it,
    :class:`TrainingDiverged` at the first non-finite loss and :class:`TrainingInterrupted` on Ctrl-C."""
    from kdad.registry import get_method

    spec = get_method(config["method"])
    if spec.training is None:
        return fit_method(config, return_model)
    with paddle.utils.unique_name.guard():
        rank, world_size = _world()
        return _in_run(config, lambda run: _train(config, spec, run, rank, world_size, return_model), rank,
                       world_size)


def _finite_weights(layer: paddle.nn.Layer) -> bool:
    return all(bool(paddle.isfinite(p).all()) for p in layer.parameters())


def _student_state(config: Mapping[str, Any], model: Any, student: paddle.nn.Layer) -> Dict[str, Any]:
    """What a checkpoint keeps of a trained model: KDAD its cloner (``cloner``, the format of every
    KDAD checkpoint); other methods everything but a pretrained backbone (``model``)."""
    if config["method"] == "kdad":
        return {"cloner": student.state_dict()}
    return {"backbone": backbone_of(config),
            "model": model.checkpoint_state(include_backbone=not config["backbone_pretrained"])}


def _restore_student(config: Mapping[str, Any], model: Any, student: paddle.nn.Layer,
                     state: Mapping[str, Any], path: str) -> None:
    if config["method"] == "kdad":
        student.set_state_dict(state["cloner"])
    else:
        model.load_fitted_state(state["model"], path)


def _train(config: Dict[str, Any], spec: Any, run: Optional[_RunFolder], rank: int, world_size: int,
           return_model: bool):
    training: TrainingSpec = spec.training
    method = config["method"]
    out_dir = class_dir(config)
    latest = os.path.join(out_dir, LATEST_NAME)
    notes = list(run.notes) if run else []
    resumed_state = None
    if config["continue_train"]:
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"continue_train is set but there is no checkpoint '{latest}'")
        resumed_state = load_checkpoint(latest)
        config, adopted = resume_config(config, resumed_state, latest)
        notes += adopted
    seed_everything(int(config["seed"]))
    threads = set_cpu_threads(int(config["cpu_threads"]), world_size)
    name = class_name(config)
    log = get_logger(f"train.{method}.{name}.{rank}", log_path(config, "train") if rank == 0 else "",
                     console=rank == 0)
    for note in notes:
        log.info(note)

    train_images, holdout_images, record = _read_split(config)
    if resumed_state is not None and resumed_state.get("split"):
        problems = compare_split(resumed_state["split"], record)
        if problems:
            raise ValueError(f"continue_train: the training images differ from those '{latest}' was trained "
                             f"on ({'; '.join(problems)}); resume on the same images or start a new run")
    n_normal = len(train_images) + len(holdout_images)

    model = spec.build_model(config)
    if method == "kdad":
        check_taps_match(model.expert, model.cloner, int(config["mvtec_img_size"]))
    student = training.student(model)
    if method == "kdad" and not config["pretrain"]:
        expert_path = os.path.join(out_dir, RANDOM_EXPERT_NAME)
        if config["continue_train"]:
            if not os.path.isfile(expert_path):
                raise FileNotFoundError(f"continue_train: the run was trained with a random expert "
                                        f"(pretrain: False), whose weights '{expert_path}' are missing")
            model.expert.set_state_dict(paddle.load(expert_path))
        elif rank == 0:
            atomic_save(model.expert.state_dict(), expert_path)
            run.created.append(expert_path)
    optimizer = training.optimizer(config, student.parameters())

    start_epoch = 0
    run_info = _new_run_info()
    if resumed_state is not None:
        _restore_student(config, model, student, resumed_state, latest)
        optimizer.set_state_dict(resumed_state["optimizer"])
        start_epoch = int(resumed_state["epoch"]) + 1
        run_info = resumed_state.get("run")  # None: a run older than run ids goes on without one
        if start_epoch > int(config["num_epochs"]):
            raise ValueError(f"continue_train: '{latest}' is at epoch {start_epoch - 1}, beyond num_epochs "
                             f"{config['num_epochs']}; raise num_epochs to train on")
        log.info(f"resumed from {latest} at epoch {start_epoch}")
    else:
        log.info(f"run {run_info['id']} started in {out_dir}")

    trained = student
    if world_size > 1 and training.data_parallel:
        trained = paddle.DataParallel(student)
    elif world_size > 1:  # the method averages its own gradients; start every rank from rank 0's weights
        broadcast_parameters(student)
    cached = None
    if training.prepare is not None:
        training.prepare(model, config)
    if config["cache_expert_features"] and training.cacheable:  # the frozen teacher's output is fixed
        t0 = time.time()
        model.eval()
        cached = cache_teacher_features(training, model, train_images, int(config["eval_batch_size"]))
        size = sum(value.nbytes for value in cached.values()) / 2 ** 20
        log.info(f"cached teacher features of {len(train_images)} images ({size:.0f} MB) in "
                 f"{time.time() - t0:.1f}s")

    class _Indices(paddle.io.Dataset):
        def __len__(self) -> int:
            return len(train_images)

        def __getitem__(self, i: int) -> int:
            return i

    sampler = paddle.io.DistributedBatchSampler(_Indices(), batch_size=int(config["batch_size"]),
                                                shuffle=True, drop_last=False)
    if method == "kdad":
        teacher = f"expert {config['expert']} (pretrain={config['pretrain']})"
    elif getattr(model, "backbone", None) is None:
        teacher = "no backbone"
    else:
        teacher = f"backbone {config['backbone']} (pretrained={config['backbone_pretrained']})"
    log.info(f"method {method}, class {name}: {len(train_images)} training images, {len(holdout_images)} "
             f"held out (seed {config['seed']}); {teacher}; {config['mvtec_img_size']} px; world size "
             f"{world_size}, {threads} CPU threads per process")
    _log_calibration_plan(log, len(holdout_images), n_normal, config)
    log.info("config:\n" + dump_config(config))
    num_epochs = int(config["num_epochs"])

    def diverged(what: str, epoch: int) -> TrainingDiverged:
        if run is not None and run.checkpoint is not None:
            kept = (f"the last checkpoint '{run.checkpoint[1]}' (epoch {run.checkpoint[0]}) is kept. Start "
                    "again with a lower learning_rate (-o overwrite=True replaces this run)")
        elif resumed_state is not None:
            kept = f"'{latest}' (epoch {start_epoch - 1}) is kept"
        else:
            kept = "nothing was kept. Start again with a lower learning_rate"
        error = TrainingDiverged(
            f"training stopped at epoch {epoch}: {what}: the run diverged (learning_rate "
            f"{float(config['learning_rate']):g} may be too high). No final model was written; {kept}")
        log.info(f"ERROR: {error}")
        return error

    epochs = range(start_epoch, num_epochs)
    if config["progress_bar"] and rank == 0:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc=f"train {name}", initial=start_epoch, total=num_epochs)
    for epoch in epochs:
        model.train()
        sampler.set_epoch(int(config["seed"]) * 100003 + epoch)
        t0, losses = time.time(), []
        for batch_number, batch_indices in enumerate(sampler):
            index = np.asarray(batch_indices)
            x = paddle.to_tensor(train_images[index])
            if cached is not None:
                teacher_feats = {key: paddle.to_tensor(value[index]) for key, value in cached.items()}
            else:
                teacher_feats = training.teacher_features(model, x)
            rng = np.random.default_rng([int(config["seed"]), epoch, batch_number, rank])
            if training.step is not None:  # the method's own optimiser steps (several per batch)
                value = float(training.step(model, trained, x, teacher_feats, rng, optimizer))
                if not all_finite(value):
                    raise diverged(f"the loss is {value} in batch {batch_number}", epoch)
                losses.append(value)
                continue
            loss = training.loss(model, trained, x, teacher_feats, rng)
            value = float(loss)
            if not all_finite(value):  # before the step: the weights stay the last good ones
                raise diverged(f"the loss is {value} in batch {batch_number}", epoch)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            losses.append(value)
        if isinstance(optimizer._learning_rate, paddle.optimizer.lr.LRScheduler):
            optimizer._learning_rate.step()  # epoch-based schedules; resumed with the optimiser
        epoch_loss = float(np.mean(losses))
        periodic = int(config["save_every"]) > 0 and epoch % int(config["save_every"]) == 0
        if (periodic or epoch == num_epochs - 1) and not _finite_weights(student):
            raise diverged("the weights are no longer finite after its last step", epoch)
        if rank == 0:
            seconds = time.time() - t0
            log.info(f"epoch {epoch} loss {epoch_loss:.6f} time {seconds:.2f}s "
                     f"({len(train_images) / max(seconds, 1e-9):.3g} img/s)")
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{epoch_loss:.4f}")
            if periodic or epoch == num_epochs - 1:
                state = {"method": method, **_student_state(config, model, student),
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "loss": epoch_loss,
                         "config": dict(config), "run": run_info, "split": record}
                if periodic and config["keep_checkpoints"]:
                    atomic_save(state, os.path.join(out_dir, epoch_checkpoint_name(epoch)))
                atomic_save(state, latest)
                run.checkpoint = (epoch, latest)
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        return (None, model) if return_model else None
    model.eval()
    if training.finalize is not None:
        training.finalize(model, train_images, config)
    try:
        calibration = (calibrate(model, holdout_images, config, n_normal) if method == "kdad" else
                       calibrate_maps(model, holdout_images, config, n_normal))
    except TrainingDiverged as error:
        raise diverged(str(error), num_epochs - 1) from None
    _log_calibration(log, calibration)
    final = os.path.join(out_dir, FINAL_NAME)
    atomic_save({"method": method, **_student_state(config, model, student), "epoch": num_epochs - 1,
                 "loss": epoch_loss if start_epoch < num_epochs else None, "config": dict(config),
                 "calibration": calibration, "run": run_info, "split": record}, final)
    log.info(f"saved {final}")
    return (final, model) if return_model else final
