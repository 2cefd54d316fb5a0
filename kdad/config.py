"""YAML configuration with typed keys, defaults and ``-o key=value`` overrides.

The keys of the original KDAD ``config.yaml`` keep their meaning; new keys have defaults. Every
key is checked before any work starts: an unknown key, a wrong type or a missing file is an error
that names the key (and the file).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import yaml

# key: (type, default, help). ``float`` accepts ints and numeric strings such as "1e-3"
# (PyYAML reads 1e-3 without a dot as a string, as in the original config file).
SCHEMA: Dict[str, Tuple[type, Any, str]] = {
    # --- keys of the original KDAD config ---
    "experiment_name": (str, "kdad", "name used in log headers"),
    "dataset_name": (str, "mvtec", "mvtec (MVTec AD layout) or folder (good/defect folders, no masks)"),
    "normal_class": (str, "", "the class (MVTec category) trained as normal"),
    "num_epochs": (int, 601, "training epochs (paper: 601 for MVTec)"),
    "batch_size": (int, 64, "training batch size (per process)"),
    "learning_rate": (float, 1e-3, "learning rate of the method's optimiser (KDAD, RD4AD: Adam; STFPM: SGD)"),
    "mvtec_img_size": (int, 128, "input size (square) after resizing"),
    "lamda": (float, 0.5, "weight of the MSE term (paper: 0.5 MVTec, 0.01 otherwise)"),
    "pretrain": (bool, True, "True: ImageNet expert; False: Xavier-initialised expert saved with the model"),
    "use_bias": (bool, False, "bias in the cloner's convolutions"),
    "equal_network_size": (bool, False, "cloner config A (VGG16 widths) instead of B"),
    "direction_loss_only": (bool, False, "use only the cosine (direction) term"),
    "continue_train": (bool, False, "resume the run in the class folder from its checkpoint_latest (the "
                                    "network and training keys must match the checkpoint's)"),
    "localization_test": (bool, True, "compute localization maps and pixel metrics in test"),
    "localization_method": (str, "gradients", "gradients | smooth_grad | gbp (the paper's) | feature_map "
                                              "(forward-only map of the exported feature_map/ model)"),
    "last_checkpoint": (int, -1, "original key, unused: evaluation takes --model_path"),
    # --- new keys ---
    "expert": (str, "vgg16", "vgg16 (the paper) or efficientnet_lite0"),
    "expert_weights": (str, "weights/vgg16.pdparams", "VGG16 ImageNet weights (pretrain: True)"),
    "dataset_root": (str, "", "folder holding <normal_class>/train, test, ground_truth"),
    "save_dir": (str, "output", "checkpoints go to <save_dir>/<normal_class>/ (other methods: "
                                "<save_dir>/<method>/<normal_class>/); one run per folder"),
    "overwrite": (bool, False, "start a new run in a class folder that holds another run: delete that run's "
                               "checkpoints first (without it training refuses)"),
    "log_dir": (str, "logs", "<class>_train.log and <class>_val.log go here"),
    "seed": (int, 42, "random seed (numpy, paddle, python)"),
    "save_every": (int, 10, "checkpoint every N epochs (0: only the final one)"),
    "keep_checkpoints": (bool, True, "keep every periodic checkpoint (needed for checkpoint averaging)"),
    "cache_expert_features": (bool, True, "compute the frozen expert's (teacher's) features once per "
                                          "training image"),
    "holdout_fraction": (float, 0.1, "fraction of the normal training images held out for threshold "
                                     "calibration (seeded; recorded in the checkpoint)"),
    "test_fraction": (float, 0.2, "folder dataset: fraction of the good images kept for the test set "
                                  "(seeded; never trained on or used for calibration); the rest is split "
                                  "by holdout_fraction"),
    "min_calibration_images": (int, 2, "fewest held-out normal images a threshold is calibrated on; with "
                                       "fewer no threshold is stored (predict/infer then need --threshold)"),
    "false_reject_rate": (float, 0.01, "OK/NG threshold: the rate of held-out normals called NG"),
    "require_masks": (bool, True, "a defective test image without a mask is an error"),
    "good_dir": (str, "good", "folder dataset: name of the normal folder"),
    "defect_dir": (str, "defect", "folder dataset: name of the defective folder"),
    "eval_batch_size": (int, 16, "batch size for scoring and localization"),
    "blur_sigma": (float, 4.0, "Gaussian blur of localization maps (paper: 4)"),
    "smoothgrad_samples": (int, 50, "SmoothGrad: noisy copies per image"),
    "smoothgrad_sigma": (float, 0.05, "SmoothGrad: noise level multiplier (original code: 0.05)"),
    "num_workers": (int, 0, "DataLoader worker processes"),
    "cpu_threads": (int, 0, "CPU math threads of training and evaluation (0: all cores / processes)"),
    "progress_bar": (bool, True, "show a tqdm progress bar"),
    "average_from_epoch": (int, 0, "checkpoint averaging: first epoch counted (after convergence)"),
    # --- the method and its backbone (methods other than KDAD; KDAD uses 'expert') ---
    "method": (str, "kdad", "kdad | padim | patchcore | stfpm | rd4ad | cflow | draem (kdad.registry)"),
    "backbone": (str, "efficientnet_lite0", "backbone (teacher) of the methods other than KDAD: "
                                            "efficientnet_lite0/1/2 (offline), resnet18, wide_resnet50_2 "
                                            "(weights file needed)"),
    "backbone_pretrained": (bool, True, "ImageNet weights for the backbone (False: random init, saved with "
                                        "the model; for tests)"),
    "backbone_weights": (str, "", "ResNet/WRN ImageNet .pdparams (default: weights/<backbone>.pdparams)"),
    "layers": (list, [], "backbone taps the method uses (empty: the method's default for the backbone)"),
    "feature_dim": (int, 0, "PaDiM: channels kept at random (0: the paper's / backbone default)"),
    "coreset_ratio": (float, 0.1, "PatchCore: fraction of training patches kept in the memory bank"),
    "num_neighbors": (int, 9, "PatchCore: neighbours of the re-weighting of the image score (paper b=9)"),
    "coreset_method": (str, "fast", "PatchCore coreset: fast (cell-partitioned lazy greedy) | exact (the "
                                    "reference greedy k-center) | bruteforce (its plain loop)"),
    "coreset_cell_size": (int, 1024, "PatchCore fast coreset: rows per cell (a pick reads at most these)"),
    "coreset_probes": (int, 16, "PatchCore fast coreset: neighbouring cells a new centre is compared with"),
    "patchcore_bank_chunk": (int, 2048, "PatchCore: bank rows per distance chunk of the exported model "
                                        "(bounds its scratch memory per batch)"),
    "anomaly_source_path": (str, "", "DRAEM: folder of texture images blended into training images as "
                                     "simulated anomalies (empty: textures the project generates)"),
    "draem_width": (int, 128, "DRAEM: base width of the reconstructive network (the discriminative one: "
                              "half); paper 128; smaller only for quick checks"),
    "fiber_batch": (int, 256, "CFlow-AD: feature vectors (fibers) per flow step (paper N=256)"),
    "feature_engine": (str, "paddle_inference", "PatchCore fitting features: paddle_inference (a "
                                                "temporary static model, oneDNN) | dygraph"),
}

# Defaults of a method that differ from the table above; a value from the config file or the
# command line always wins.
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "padim": {"mvtec_img_size": 256, "num_epochs": 1, "batch_size": 32},
    "patchcore": {"mvtec_img_size": 256, "num_epochs": 1, "batch_size": 32},
    # the papers' recipes (STFPM: SGD, RD4AD: Adam betas (0.5, 0.999); see each method's train.py)
    "stfpm": {"mvtec_img_size": 256, "num_epochs": 100, "batch_size": 32, "learning_rate": 0.4},
    "rd4ad": {"mvtec_img_size": 256, "num_epochs": 200, "batch_size": 16, "learning_rate": 0.005},
    # DRAEM: a checkpoint with Adam's state is 1.2 GB: periodic ones are not kept by default
    "draem": {"mvtec_img_size": 256, "num_epochs": 700, "batch_size": 8, "learning_rate": 1e-4,
              "keep_checkpoints": False},
    # CFlow-AD: 25 meta epochs x 8 sub-epochs (kdad/methods/cflow/train.py)
    "cflow": {"mvtec_img_size": 256, "num_epochs": 200, "batch_size": 32, "learning_rate": 2e-4},
}

LOCALIZATION_METHODS = ("gradients", "smooth_grad", "gbp", "feature_map")
DATASET_NAMES = ("mvtec", "folder")
# kdad.registry.METHODS (tested to agree)
METHOD_NAMES = ("kdad", "padim", "patchcore", "stfpm", "rd4ad", "cflow", "draem")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


class Config(dict):
    """A validated configuration; :attr:`explicit` names the keys set by a file or the command line
    (the rest are defaults), so a checkpoint can tell a requested value from a default one."""

    explicit: frozenset = frozenset()


def default_config() -> Dict[str, Any]:
    return {key: copy.deepcopy(default) for key, (_, default, _) in SCHEMA.items()}


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = SCHEMA[key][0]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind is list:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return [str(item) for item in value]
    raise ConfigError(f"{source}: '{key}' must be {kind.__name__}, got {value!r} ({type(value).__name__})")


def parse_overrides(items: Optional[Iterable[str]]) -> Dict[str, Any]:
    """Turn ``["key=value", ...]`` into a dict, values parsed as YAML scalars."""
    result: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        result[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return result


def load_config(
    path: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Defaults, then the YAML file, then ``overrides``; validated."""
    config = default_config()
    explicit: Dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of key: value")
        _merge(config, loaded, f"config file '{path}'")
        explicit.update(loaded)
    if overrides:
        _merge(config, overrides, "command line")
        explicit.update(overrides)
    for key, value in METHOD_DEFAULTS.get(config["method"], {}).items():
        if key not in explicit:
            config[key] = value
    validate(config)
    result = Config(config)
    result.explicit = frozenset(explicit)
    return result


def _merge(config: Dict[str, Any], values: Mapping[str, Any], source: str) -> None:
    for key, value in values.items():
        if key not in SCHEMA:
            close = [known for known in SCHEMA if known.lower() == str(key).lower()]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        if value is None:
            raise ConfigError(f"{source}: '{key}' has no value")
        config[key] = _coerce(key, value, source)


def validate(config: Mapping[str, Any]) -> None:
    """Check value ranges and choices (types are checked while merging)."""
    for key, (kind, _, _) in SCHEMA.items():
        if kind is float and key in config and not math.isfinite(config[key]):
            raise ConfigError(f"'{key}' must be a finite number, got {config[key]}")
    checks = [
        (config["num_epochs"] >= 1, "num_epochs must be >= 1"),
        (config["batch_size"] >= 1, "batch_size must be >= 1"),
        (config["fiber_batch"] >= 1, "fiber_batch must be >= 1"),
        (config["learning_rate"] > 0, "learning_rate must be > 0"),
        (config["mvtec_img_size"] >= 32 and config["mvtec_img_size"] % 32 == 0,
         "mvtec_img_size must be a multiple of 32 (the networks pool 5 times)"),
        (config["lamda"] >= 0, "lamda must be >= 0"),
        (0 <= config["holdout_fraction"] < 1, "holdout_fraction must be in [0, 1)"),
        (0 <= config["test_fraction"] < 1, "test_fraction must be in [0, 1)"),
        (config["min_calibration_images"] >= 1, "min_calibration_images must be >= 1"),
        (not (config["continue_train"] and config["overwrite"]),
         "continue_train and overwrite exclude each other: resume the run or replace it"),
        (0 < config["false_reject_rate"] < 1, "false_reject_rate must be in (0, 1)"),
        (config["localization_method"] in LOCALIZATION_METHODS,
         f"localization_method must be one of {LOCALIZATION_METHODS}"),
        (config["dataset_name"] in DATASET_NAMES, f"dataset_name must be one of {DATASET_NAMES}"),
        (config["save_every"] >= 0, "save_every must be >= 0"),
        (config["eval_batch_size"] >= 1, "eval_batch_size must be >= 1"),
        (config["smoothgrad_samples"] >= 1, "smoothgrad_samples must be >= 1"),
        (config["method"] in METHOD_NAMES, f"method must be one of {METHOD_NAMES}"),
        (0 < config["coreset_ratio"] <= 1, "coreset_ratio must be in (0, 1]"),
        (config["num_neighbors"] >= 1, "num_neighbors must be >= 1"),
        (config["coreset_method"] in ("fast", "exact", "bruteforce"),
         "coreset_method must be fast, exact or bruteforce"),
        (config["coreset_cell_size"] >= 2, "coreset_cell_size must be >= 2"),
        (config["coreset_probes"] >= 0, "coreset_probes must be >= 0"),
        (config["patchcore_bank_chunk"] >= 1, "patchcore_bank_chunk must be >= 1"),
        (config["feature_engine"] in ("paddle_inference", "dygraph"),
         "feature_engine must be paddle_inference or dygraph"),
        (config["feature_dim"] >= 0, "feature_dim must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def require_dataset(config: Mapping[str, Any]) -> str:
    """Return the class folder, or raise a clear error when it is missing."""
    if not config["dataset_root"]:
        raise ConfigError("dataset_root is not set: pass --dataset_root DIR or -o dataset_root=DIR")
    if not config["normal_class"] and config["dataset_name"] == "mvtec":
        raise ConfigError("normal_class is not set: pass --normal_class NAME")
    folder = os.path.join(config["dataset_root"], config["normal_class"])
    if not os.path.isdir(folder):
        raise ConfigError(f"dataset folder '{folder}' does not exist (dataset_root + normal_class)")
    return folder


def dump_config(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=True)
