"""Training loop: cached expert features, atomic resumable checkpoints, data parallel, calibration."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping

import numpy as np
import paddle
import paddle.distributed as dist

from kdad.config import dump_config
from kdad.engine.common import (
    class_dir,
    class_name,
    dataset,
    log_path,
    predict_maps,
    score_images,
    seed_everything,
    set_cpu_threads,
    split_train,
)
from kdad.methods.kdad.localization import localization_maps
from kdad.methods.kdad.loss import training_loss
from kdad.methods.kdad.model import KDADModel, build_model, check_taps_match
from kdad.postprocess import normal_map_statistics, threshold_from_normal_scores
from kdad.utils.checkpoint import (
    FINAL_NAME,
    LATEST_NAME,
    RANDOM_EXPERT_NAME,
    atomic_save,
    epoch_checkpoint_name,
    load_checkpoint,
)
from kdad.utils.logger import get_logger


def _world() -> tuple:
    world_size = dist.get_world_size()
    if world_size > 1 and not dist.is_initialized():
        dist.init_parallel_env()
    return dist.get_rank(), world_size


def cache_expert_features(model: KDADModel, images: np.ndarray, batch_size: int) -> Dict[int, np.ndarray]:
    """The expert's loss-tap activations for every training image, computed once."""
    chunks: Dict[int, List[np.ndarray]] = {tap: [] for tap in model.loss_taps}
    for start in range(0, len(images), batch_size):
        feats = model.expert_loss_features(paddle.to_tensor(images[start:start + batch_size]))
        for tap, value in feats.items():
            chunks[tap].append(value.numpy())
    return {tap: np.concatenate(parts) for tap, parts in chunks.items()}


def calibrate(model: KDADModel, holdout_images: np.ndarray, config: Mapping[str, Any]) -> Dict[str, Any]:
    """OK/NG threshold and heatmap scale from held-out normal training images (never the test set)."""
    if len(holdout_images) == 0:
        return {"threshold": None, "holdout_images": 0,
                "note": "holdout_fraction is 0: no threshold; pass --threshold when predicting"}
    scores = score_images(model, holdout_images, int(config["eval_batch_size"]))
    raw_maps = []
    for start in range(0, len(holdout_images), int(config["eval_batch_size"])):
        batch = paddle.to_tensor(holdout_images[start:start + int(config["eval_batch_size"])])
        _, _, raw = localization_maps(model, batch, "gradients", float(config["blur_sigma"]))
        raw_maps.append(raw)
    rate = float(config["false_reject_rate"])
    return {
        "threshold": threshold_from_normal_scores(scores, rate),
        "false_reject_rate": rate,
        "holdout_images": int(len(scores)),
        "holdout_score_mean": float(scores.mean()),
        "holdout_score_std": float(scores.std()),
        "holdout_score_max": float(scores.max()),
        "map_statistics": normal_map_statistics(np.concatenate(raw_maps)),
    }


def calibrate_maps(model: Any, holdout_images: np.ndarray, config: Mapping[str, Any]) -> Dict[str, Any]:
    """OK/NG threshold and map scale of a method's model from held-out normal training images."""
    if len(holdout_images) == 0:
        return {"threshold": None, "holdout_images": 0,
                "note": "holdout_fraction is 0: no threshold; pass --threshold when predicting"}
    scores, maps = predict_maps(model, holdout_images, int(config["eval_batch_size"]))
    rate = float(config["false_reject_rate"])
    return {
        "threshold": threshold_from_normal_scores(scores, rate),
        "false_reject_rate": rate,
        "holdout_images": int(len(scores)),
        "holdout_score_mean": float(scores.mean()),
        "holdout_score_std": float(scores.std()),
        "holdout_score_max": float(scores.max()),
        "map_statistics": normal_map_statistics(maps),
    }


def fit_method(config: Dict[str, Any], return_model: bool = False):
    """Fit a training-free method (PaDiM, PatchCore) on the normal training images of ``config``,
    calibrate on the held-out ones and write ``model_final.pdparams``; returns its path."""
    from kdad.registry import get_method

    spec = get_method(config["method"])
    if dist.get_world_size() > 1:
        raise ValueError(f"{config['method']} fits in one pass in one process; run tools/train.py without "
                         "paddle.distributed.launch (data parallelism applies to trained methods)")
    seed_everything(int(config["seed"]))
    threads = set_cpu_threads(int(config["cpu_threads"]))
    out_dir = class_dir(config)
    name = class_name(config)
    log = get_logger(f"fit.{config['method']}.{name}", log_path(config, "train"), console=True)
    train_samples, holdout_samples = split_train(config)
    t0 = time.time()
    train_images = dataset(train_samples, config).images()
    holdout_images = dataset(holdout_samples, config).images() if holdout_samples else train_images[:0]
    log.info(f"method {config['method']}, class {name}: {len(train_images)} training images, "
             f"{len(holdout_images)} held out for calibration; backbone {config['backbone']} "
             f"(pretrained={config['backbone_pretrained']}), {config['mvtec_img_size']} px, {threads} CPU "
             f"threads; images read in {time.time() - t0:.1f}s")
    log.info("config:\n" + dump_config(config))
    model = spec.build_model(config)
    t0 = time.time()
    facts = spec.fit(model, train_images, config, log)
    fit_seconds = time.time() - t0
    log.info(f"fitted in {fit_seconds:.1f}s: {facts}")
    model.eval()
    calibration = calibrate_maps(model, holdout_images, config)
    log.info(f"calibration on {calibration['holdout_images']} held-out normal images: "
             f"threshold {calibration['threshold']}")
    final = os.path.join(out_dir, FINAL_NAME)
    atomic_save({"method": config["method"], "backbone": config["backbone"], "epoch": 0,
                 "model": model.checkpoint_state(include_backbone=not config["backbone_pretrained"]),
                 "config": dict(config), "calibration": calibration,
                 "fit": {**facts, "fit_seconds": round(fit_seconds, 2)}}, final)
    log.info(f"saved {final}")
    return (final, model) if return_model else final


def train(config: Dict[str, Any], return_model: bool = False):
    """Train (KDAD) or fit (training-free methods) the model of ``config``; returns the final
    checkpoint path (rank 0) or None.

    With ``return_model`` returns ``(path_or_None, model)`` (every rank; used by tests).
    Parameter names (which key the optimizer state) are generated afresh, so resuming works in a
    process that has built other layers before."""
    if config["method"] != "kdad":
        return fit_method(config, return_model)
    with paddle.utils.unique_name.guard():
        return _train(config, return_model)


def _train(config: Dict[str, Any], return_model: bool):
    rank, world_size = _world()
    seed_everything(int(config["seed"]))
    threads = set_cpu_threads(int(config["cpu_threads"]), world_size)
    out_dir = class_dir(config)
    name = class_name(config)
    log = get_logger(f"train.{name}.{rank}", log_path(config, "train") if rank == 0 else "",
                     console=rank == 0)

    train_set_samples, holdout_samples = split_train(config)
    train_images = dataset(train_set_samples, config).images()
    holdout_images = dataset(holdout_samples, config).images() if holdout_samples else train_images[:0]

    model = build_model(config)
    check_taps_match(model.expert, model.cloner, int(config["mvtec_img_size"]))
    if not config["pretrain"]:
        expert_path = os.path.join(out_dir, RANDOM_EXPERT_NAME)
        if config["continue_train"] and os.path.isfile(expert_path):
            model.expert.set_state_dict(paddle.load(expert_path))
        elif rank == 0:
            atomic_save(model.expert.state_dict(), expert_path)
    optimizer = paddle.optimizer.Adam(learning_rate=float(config["learning_rate"]),
                                      parameters=model.cloner.parameters())

    start_epoch = 0
    latest = os.path.join(out_dir, LATEST_NAME)
    if config["continue_train"]:
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"continue_train is set but there is no checkpoint '{latest}'")
        state = load_checkpoint(latest)
        model.cloner.set_state_dict(state["cloner"])
        optimizer.set_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        log.info(f"resumed from {latest} at epoch {start_epoch}")

    cloner = paddle.DataParallel(model.cloner) if world_size > 1 else model.cloner
    cached = None
    if config["cache_expert_features"]:
        t0 = time.time()
        cached = cache_expert_features(model, train_images, int(config["eval_batch_size"]))
        log.info(f"cached expert features of {len(train_images)} images in {time.time() - t0:.1f}s")

    class _Indices(paddle.io.Dataset):
        def __len__(self) -> int:
            return len(train_images)

        def __getitem__(self, i: int) -> int:
            return i

    sampler = paddle.io.DistributedBatchSampler(_Indices(), batch_size=int(config["batch_size"]),
                                                shuffle=True, drop_last=False)
    log.info(f"class {name}: {len(train_images)} training images, {len(holdout_images)} held out; "
             f"expert {config['expert']} (pretrain={config['pretrain']}); world size {world_size}, "
             f"{threads} CPU threads per process")
    log.info("config:\n" + dump_config(config))
    num_epochs = int(config["num_epochs"])
    epochs = range(start_epoch, num_epochs)
    if config["progress_bar"] and rank == 0:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc=f"train {name}", initial=start_epoch, total=num_epochs)
    for epoch in epochs:
        model.train()
        sampler.set_epoch(int(config["seed"]) * 100003 + epoch)
        t0, losses = time.time(), []
        for batch_indices in sampler:
            index = np.asarray(batch_indices)
            x = paddle.to_tensor(train_images[index])
            if cached is not None:
                expert_feats = {tap: paddle.to_tensor(value[index]) for tap, value in cached.items()}
            else:
                expert_feats = model.expert_loss_features(x)
            loss = training_loss(cloner(x), expert_feats, model.loss_taps, model.lamda, model.direction_only)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            losses.append(float(loss))
        epoch_loss = float(np.mean(losses))
        if rank == 0:
            log.info(f"epoch {epoch} loss {epoch_loss:.6f} time {time.time() - t0:.2f}s")
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{epoch_loss:.4f}")
            periodic = int(config["save_every"]) > 0 and epoch % int(config["save_every"]) == 0
            if periodic or epoch == num_epochs - 1:
                state = {"method": "kdad", "cloner": model.cloner.state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "loss": epoch_loss,
                         "config": dict(config)}
                if periodic and config["keep_checkpoints"]:
                    atomic_save(state, os.path.join(out_dir, epoch_checkpoint_name(epoch)))
                atomic_save(state, latest)
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        return (None, model) if return_model else None
    model.eval()
    calibration = calibrate(model, holdout_images, config)
    log.info(f"calibration on {calibration['holdout_images']} held-out normal images: "
             f"threshold {calibration['threshold']}")
    final = os.path.join(out_dir, FINAL_NAME)
    atomic_save({"method": "kdad", "cloner": model.cloner.state_dict(), "epoch": num_epochs - 1,
                 "config": dict(config), "calibration": calibration}, final)
    log.info(f"saved {final}")
    return (final, model) if return_model else final
