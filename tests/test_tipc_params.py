"""The TIPC params files against the standard TIPC line rules (issue 13, "standard TIPC").

The standard driver (PaddleOCR/PaddleClas ``test_tipc/test_train_inference_python.sh`` with their
``common_func.sh``; the spec says it "needs no modification") reads lines 1-51 of
``train_infer_python.txt`` by index and parses each with a few helpers. Those rules are written
below as data, with a small emulation of the helpers, and every committed params file is checked
against them: plain values where the standard driver reads one value, per-mode lists only where it
resolves them, device lists its launcher accepts, commands that exist. Then:

* this repository's driver must build the same commands as the standard one for the standard file
  (``TIPC_DRY_RUN=1``), adding only the extension runs of ``tipc_ext.txt``, and must refuse a file
  the standard driver would misread;
* ``prepare.sh`` must work with only the standard helpers (a ``common_func.sh`` with just those,
  written here from the rules) and create every path the params file names.

Nothing of the upstream scripts is stored here; see test_tipc/docs/test_train_inference_python.md.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "test_tipc" / "configs"
TRAIN_PARAMS = sorted(str(p.relative_to(ROOT)) for p in CONFIGS.glob("*/*.txt")
                      if p.name.startswith("train_") and "infer_python" in p.name)
STANDARD_MODES = ("lite_train_lite_infer", "lite_train_whole_infer", "whole_infer", "whole_train_whole_infer")
TRAIN_MODES = ("lite_train_lite_infer", "lite_train_whole_infer", "whole_train_whole_infer")

# ------------------------------------------------------------------------------ the line rules
N_LINES = 51  # the standard driver reads physical lines 1-51 only (awk NR==1,NR==51)
BANNERS = {0: "train_params", 22: "eval_params", 26: "infer_params"}
SEPARATORS = (13, 21, 25)  # "##"
# How the standard driver reads each line (0-based index of the split lines):
#   value      func_parser_value: field 1 of a ':' split, used as ONE value
#   key        func_parser_key only (the driver supplies the value)
#   keyvalue   key and value both used (value single)
#   mode_list  func_parser_params: the value is "mode=v|mode=v", the current MODE's entry is used
#   list       '|' list iterated by the driver
#   ignored    not read
RULES: Dict[int, Tuple[str, str]] = {
    1: ("value", "model_name"), 2: ("value", "python"), 3: ("list", "gpu_list"),
    4: ("list", "train use_gpu (aligned with gpu_list)"), 5: ("list", "autocast"),
    6: ("mode_list", "epochs"), 7: ("key", "save model dir"), 8: ("mode_list", "train batch size"),
    9: ("keyvalue", "pretrained weights"), 10: ("value", "train_model_name"),
    11: ("value", "train_infer_img_dir"), 12: ("keyvalue", "extra train flag"),
    14: ("list", "trainer names"), 15: ("value", "norm_train"), 16: ("value", "pact_train"),
    17: ("value", "fpgm_train"), 18: ("value", "distill_train"), 19: ("keyvalue", "trainer 1"),
    20: ("keyvalue", "trainer 2"), 23: ("value", "eval"), 24: ("keyvalue", "eval flag"),
    27: ("key", "export save dir"), 28: ("key", "export weights"), 29: ("value", "norm_export"),
    30: ("value", "quant_export"), 31: ("value", "fpgm_export"), 32: ("value", "distill_export"),
    33: ("keyvalue", "export 1"), 34: ("keyvalue", "export 2"), 35: ("value", "inference_dir"),
    36: ("list", "infer_model (whole_infer)"), 37: ("list", "infer_export (whole_infer)"),
    38: ("list", "infer_quant (whole_infer)"), 39: ("value", "inference script"),
    40: ("list", "use_gpu"), 41: ("list", "enable_mkldnn"), 42: ("list", "cpu_threads"),
    43: ("list", "batch_size"), 44: ("list", "use_tensorrt"), 45: ("list", "precision"),
    46: ("key", "model dir flag"), 47: ("keyvalue", "whole_infer input"), 48: ("keyvalue", "save log flag"),
    49: ("keyvalue", "benchmark"), 50: ("keyvalue", "extra inference flag"),
}
COMMAND_LINES = (15, 16, 17, 18, 19, 20, 23, 29, 30, 31, 32, 33, 34, 39)  # "<script> <fixed args>" or null
TRAINER_KEY_LINES = (15, 16, 17, 18, 19, 20)
LIST_DOMAINS = {  # the values the standard func_inference branches on
    40: {"True", "False", "gpu", "cpu"}, 41: {"True", "False"}, 44: {"True", "False"},
    45: {"fp32", "fp16", "int8"}, 38: {"True", "False"}, 5: {"null", "fp32", "amp", "fp16"},
}
INT_LISTS = (42, 43)


# ------------------------------------------------------------------------------ the helpers' semantics
def read_lines(path: str) -> List[str]:
    """Lines 1-51, split on newlines with blank lines dropped (bash IFS=$'\\n' array split)."""
    physical = (ROOT / path).read_text().split("\n")[:N_LINES]
    return [line for line in physical if line != ""]


def parser_key(line: str) -> str:
    return line.split(":")[0]


def parser_value(line: str) -> str:
    fields = line.split(":")
    return fields[1] if len(fields) > 1 else ""


def parser_params(line: str, mode: str) -> str:
    for item in parser_value(line).split("|"):
        fields = item.split("=")
        if fields[0] == mode:
            return fields[1] if len(fields) > 1 else ""
    return ""


def set_params(key: str, value: str) -> str:
    if key == "null" or value in ("null", " ", ""):
        return " "
    return f"{key}={value}"


def is_mode_list(value: str) -> bool:
    first = value.split("|")[0]
    return "=" in first and first.split("=")[0] in STANDARD_MODES + ("paddle2onnx_infer",)


def launcher_kind(entry: str) -> Optional[str]:
    """How the standard driver uses a gpu_list entry, or None when its launcher cannot take it."""
    if entry == "-1":
        return "cpu"
    if len(entry) <= 1:
        return "card" if entry.isdigit() else None
    if len(entry) <= 15:  # passed to paddle.distributed.launch as the device ids
        return "cards" if re.fullmatch(r"\d+(,\d+)+", entry) else None
    ips, _, cards = entry.partition(";")
    ok = re.fullmatch(r"[\d.]+(,[\d.]+)+", ips) and re.fullmatch(r"\d+(,\d+)*", cards)
    return "nodes" if ok else None


def standard_chain(path: str, mode: str) -> List[str]:
    """The commands the standard driver runs for a training MODE and the CPU / single-card entries
    (whitespace-normalised, without the '> log 2>&1' redirections)."""
    lines = read_lines(path)
    v = {i: parser_value(line) for i, line in enumerate(lines)}
    k = {i: parser_key(line) for i, line in enumerate(lines)}
    python, model = v[2], v[1]
    log_path = f"./test_tipc/output/{model}/{mode}"
    use_gpus = v[4].split("|")
    commands = []
    for count, gpu in enumerate(v[3].split("|")):
        if launcher_kind(gpu) not in ("cpu", "card"):
            continue
        train_use_gpu = use_gpus[count] if count < len(use_gpus) else ""
        for autocast in v[5].split("|"):
            for trainer in v[14].split("|"):
                run_train, run_export = v[15], v[29]  # norm_train (the only trainer used here)
                assert trainer == k[15]
                save_log = f"{log_path}/{trainer}_gpus_{gpu}_autocast_{autocast}"
                use_gpu = set_params(k[4], train_use_gpu)
                train = [python, run_train, use_gpu, set_params(k[7], save_log),
                         set_params(k[6], parser_params(lines[6], mode)), set_params(k[9], v[9]),
                         set_params(k[5], autocast), set_params(k[8], parser_params(lines[8], mode)),
                         set_params(k[12], v[12])]
                commands.append(" ".join(train))
                weights = set_params(k[9], f"{save_log}/{v[10]}")
                if v[23] != "null":
                    commands.append(" ".join([python, v[23], weights, use_gpu, set_params(k[24], v[24])]))
                if run_export == "null":
                    continue
                commands.append(" ".join([python, run_export, set_params(k[28], f"{save_log}/{v[10]}"),
                                          set_params(k[27], save_log)]))
                model_dir = save_log if v[35] in ("null", "##") else f"{save_log}/{v[35]}"
                for use_gpu_infer in v[40].split("|"):
                    if use_gpu_infer not in ("False", "cpu"):
                        continue
                    for mkldnn in v[41].split("|"):
                        for threads in v[42].split("|"):
                            for batch in v[43].split("|"):
                                for precision in v[45].split("|"):
                                    if mkldnn == "False" and precision == "fp16":
                                        continue
                                    commands.append(" ".join([
                                        python, v[39], f"{k[40]}={use_gpu_infer}", set_params(k[41], mkldnn),
                                        set_params(k[42], threads), set_params(k[46], model_dir),
                                        set_params(k[43], batch), set_params(k[48], ""),
                                        set_params(k[47], v[11]), set_params(k[49], v[49]),
                                        set_params(k[45], precision), set_params(k[50], v[50])]))
    return [" ".join(c.split()) for c in commands]


# ------------------------------------------------------------------------------ the files


def test_params_files_found() -> None:
    assert "test_tipc/configs/KDAD/train_infer_python.txt" in TRAIN_PARAMS
    assert "test_tipc/configs/KDAD_EfficientNetLite0/train_infer_python.txt" in TRAIN_PARAMS
    gpu_variant = "test_tipc/configs/KDAD/train_linux_gpu_normal_normal_infer_python_linux_gpu_cpu.txt"
    assert gpu_variant in TRAIN_PARAMS


@pytest.mark.parametrize("path", TRAIN_PARAMS)
def test_layout(path) -> None:
    physical = (ROOT / path).read_text().split("\n")
    assert "" not in physical[:N_LINES], "a blank line shifts every later index"
    lines = read_lines(path)
    assert len(lines) == N_LINES
    for idx, name in BANNERS.items():
        assert re.fullmatch(rf"=+{name}=+", lines[idx]), (idx, lines[idx])
    for idx in SEPARATORS:
        assert lines[idx] == "##", idx
    for idx, line in enumerate(lines):
        assert not re.search(r"[*?\[]", line), f"line {idx + 1}: the unquoted split would glob it"
        if idx not in BANNERS and idx not in SEPARATORS:
            assert line.count(":") == 1, f"line {idx + 1}: text after a second ':' is dropped"


@pytest.mark.parametrize("path", TRAIN_PARAMS)
def test_plain_values_where_the_standard_driver_reads_one(path) -> None:
    lines = read_lines(path)
    for idx, (how, what) in RULES.items():
        value = parser_value(lines[idx])
        if how != "mode_list":
            assert not is_mode_list(value), f"line {idx + 1} ({what}): per-mode list where one value is read"
        if how in ("value", "keyvalue"):
            assert "|" not in value, f"line {idx + 1} ({what}): a '|' list where one value is read"
        if how == "key":
            assert parser_key(lines[idx]) not in ("", "null"), f"line {idx + 1} ({what}): a key is needed"


@pytest.mark.parametrize("path", TRAIN_PARAMS)
def test_per_mode_lists(path) -> None:
    lines = read_lines(path)
    for idx in (6, 8):
        items = parser_value(lines[idx]).split("|")
        modes = [item.split("=")[0] for item in items]
        assert all(item.count("=") == 1 for item in items), "a second '=' is dropped by the split"
        assert set(modes) <= set(STANDARD_MODES) and len(set(modes)) == len(modes)
        assert set(TRAIN_MODES) <= set(modes), f"line {idx + 1}: every training mode needs an entry"
        for mode in TRAIN_MODES:
            assert parser_params(lines[idx], mode).isdigit()


@pytest.mark.parametrize("path", TRAIN_PARAMS)
def test_device_lists_the_standard_launcher_accepts(path) -> None:
    lines = read_lines(path)
    gpus = parser_value(lines[3]).split("|")
    for entry in gpus:
        assert launcher_kind(entry), f"gpu_list entry {entry!r} is not a device list of the launcher"
    use_gpu = parser_value(lines[4]).split("|")
    assert parser_key(lines[4]) == "null" or len(use_gpu) == len(gpus), "line 5 is aligned with gpu_list"
    for idx, domain in LIST_DOMAINS.items():
        values = parser_value(lines[idx]).split("|")
        assert set(values) <= domain, (idx + 1, values)
    for idx in INT_LISTS:
        assert all(v.isdigit() and int(v) > 0 for v in parser_value(lines[idx]).split("|")), idx + 1
    whole = [parser_value(lines[i]).split("|") for i in (36, 37, 38)]
    assert len(whole[0]) == len(whole[1]) == len(whole[2]), "whole_infer lists are aligned"


@pytest.mark.parametrize("path", TRAIN_PARAMS)
def test_commands_exist(path) -> None:
    lines = read_lines(path)
    model = parser_value(lines[1])
    generated = f"./test_tipc/data/{model}/"  # written by prepare.sh (test_prepare_* below)
    for idx in COMMAND_LINES:
        value = parser_value(lines[idx])
        if value == "null":
            continue
        words = shlex.split(value)
        assert words[0].endswith(".py") and (ROOT / words[0]).is_file(), f"line {idx + 1}: {words[0]}"
        for flag, arg in zip(words, words[1:]):
            if flag in ("--config", "-c"):
                assert arg.startswith(generated) or (ROOT / arg).is_file(), f"line {idx + 1}: {arg}"
    trainers = {parser_key(lines[i]) for i in TRAINER_KEY_LINES}
    for trainer in parser_value(lines[14]).split("|"):
        assert trainer in trainers, f"trainer {trainer!r} has no line 16-21"
    for entry in parser_value(lines[37]).split("|"):
        assert entry == "null" or (ROOT / shlex.split(entry)[0]).is_file()


# ------------------------------------------------------------------------------ the drivers


def run_bash(args: List[str], cwd: Path, env_extra: Optional[Dict[str, str]] = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(["bash", *args], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def dry_run(path: str, mode: str = "lite_train_lite_infer", **env: str) -> List[str]:
    done = run_bash(["test_tipc/test_train_inference_python.sh", path, mode], ROOT,
                    {"TIPC_DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stderr
    commands = [line[len("DRY RUN: "):] for line in done.stdout.splitlines() if line.startswith("DRY RUN: ")]
    return [" ".join(re.sub(r" > \S+ 2>&1\s*$", "", c).split()) for c in commands]


@pytest.mark.parametrize("path", ["test_tipc/configs/KDAD/train_infer_python.txt",
                                  "test_tipc/configs/KDAD_EfficientNetLite0/train_infer_python.txt"])
def test_our_driver_builds_the_standard_commands(path) -> None:
    ours = dry_run(path)
    standard = standard_chain(path, "lite_train_lite_infer")
    assert len(standard) == 11  # train, eval, export, 8 inference runs
    assert [c for c in ours if "_gpus_cpu" not in c] == standard
    extension = [c for c in ours if "_gpus_cpu" in c]  # from tipc_ext.txt: the data-parallel run
    assert len(extension) == 11
    assert extension[0].startswith("python -m paddle.distributed.launch --nproc_per_node 2 --host 127.0.0.1 ")
    assert dry_run(path, KDAD_TIPC_EXT="none") == standard


def test_extension_file_applies_only_to_the_files_it_extends() -> None:
    gpu = "test_tipc/configs/KDAD/train_linux_gpu_normal_normal_infer_python_linux_gpu_cpu.txt"
    commands = dry_run(gpu)
    assert not [c for c in commands if "nproc_per_node" in c]
    assert "python -m paddle.distributed.launch --devices=0,1 " in "\n".join(commands)


@pytest.mark.parametrize("line_no, text, message", [
    (16, "norm_train:lite_train_lite_infer=tools/train.py|whole_train_whole_infer=tools/train.py",
     "line 16 ('norm_train') is a per-mode list"),
    (12, "train_infer_img_dir:lite_train_lite_infer=./a|whole_infer=./b", "line 12"),
    (4, "gpu_list:-1|cpu2", "gpu_list entry 'cpu2'"),
])
def test_our_driver_refuses_what_the_standard_driver_misreads(tmp_path, line_no, text, message) -> None:
    lines = (ROOT / TRAIN_PARAMS[0]).read_text().split("\n")
    lines[line_no - 1] = text
    bad = tmp_path / "train_infer_python.txt"
    bad.write_text("\n".join(lines))
    done = run_bash(["test_tipc/test_train_inference_python.sh", str(bad), "lite_train_lite_infer"], ROOT,
                    {"TIPC_DRY_RUN": "1", "KDAD_TIPC_EXT": "none"})
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "DRY RUN" not in done.stdout


# ------------------------------------------------------------------------------ prepare.sh

# Only the helpers every standard common_func.sh has, with their semantics (unquoted echo, global
# IFS); prepare.sh must not need anything else.
STANDARD_HELPERS = r'''#!/bin/bash
function func_parser_key(){
    strs=$1; IFS=":"; array=(${strs}); tmp=${array[0]}; echo ${tmp}
}
function func_parser_value(){
    strs=$1; IFS=":"; array=(${strs}); tmp=${array[1]}; echo ${tmp}
}
function func_set_params(){
    key=$1; value=$2
    if [ ${key}x = "null"x ]; then echo " "
    elif [[ ${value} = "null" ]] || [[ ${value} = " " ]] || [ ${#value} -le 0 ]; then echo " "
    else echo "${key}=${value}"; fi
}
function func_parser_params(){
    strs=$1; MODE=$2; IFS=":"; array=(${strs}); tmp=${array[1]}; IFS="|"
    for _params in ${tmp[*]}; do
        IFS="="; array=(${_params})
        if [[ ${array[0]} = ${MODE} ]]; then IFS="|"; echo ${array[1]}; break; fi
        IFS="|"
    done
}
function status_check(){
    if [ $1 -eq 0 ]; then echo -e " Run successfully with command - $4 - $2 - $5 " | tee -a $3
    else echo -e " Run failed with command - $4 - $2 - $5 " | tee -a $3; fi
}
'''


def standard_tree(tmp_path: Path) -> Path:
    """A copy of test_tipc/ (+ configs/) whose common_func.sh has only the standard helpers."""
    tree = tmp_path / "repo"
    shutil.copytree(ROOT / "test_tipc" / "configs", tree / "test_tipc" / "configs")
    shutil.copy(ROOT / "test_tipc" / "prepare.sh", tree / "test_tipc" / "prepare.sh")
    shutil.copytree(ROOT / "configs", tree / "configs")
    (tree / "test_tipc" / "common_func.sh").write_text(STANDARD_HELPERS)
    return tree


def referenced_paths(path: str, mode: str) -> List[str]:
    lines = read_lines(path)
    found = [parser_value(lines[11]), parser_value(lines[47])]
    if mode == "whole_infer":
        found += parser_value(lines[36]).split("|")
    for idx in COMMAND_LINES:
        words = shlex.split(parser_value(lines[idx]))
        found += [arg for flag, arg in zip(words, words[1:]) if flag in ("--config", "-c", "--dataset_root")]
    return found


def check_prepared(tree: Path, path: str, mode: str) -> Dict:
    import yaml

    for ref in referenced_paths(path, mode):
        assert (tree / ref).exists(), f"{ref} (named by {path}) was not created"
    model = parser_value(read_lines(path)[1])
    data = tree / "test_tipc" / "data" / model
    assert (data / "mode").read_text().strip() == mode
    config = yaml.safe_load((data / "tipc.yaml").read_text())
    lines = read_lines(path)
    checkpoint_class = parser_value(lines[10]).split("/")[0]  # train_model_name: <class>/model_final
    assert config["normal_class"] == checkpoint_class
    assert (tree / config["dataset_root"] / checkpoint_class / "train" / "good").is_dir()
    assert any((tree / parser_value(lines[11])).rglob("*.png"))
    return config


def test_prepare_lite_with_only_the_standard_helpers(tmp_path) -> None:
    tree = standard_tree(tmp_path)
    path = "test_tipc/configs/KDAD/train_infer_python.txt"
    done = run_bash(["test_tipc/prepare.sh", path, "lite_train_lite_infer"], tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "command not found" not in done.stderr
    config = check_prepared(tree, path, "lite_train_lite_infer")
    assert config["mvtec_img_size"] == 64 and config["pretrain"] is False  # the lite config


def test_prepare_whole_mode_layout(tmp_path) -> None:
    """whole_train_whole_infer with a stand-in MVTec capsule class (EfficientNet-Lite0 needs no VGG16
    file): the same fixed paths, now the paper config and the MVTec class."""
    tree = standard_tree(tmp_path)
    mvtec = tmp_path / "mvtec"
    generate = [sys.executable, "-m", "kdad.data.synthetic", "--root", str(mvtec), "--category", "capsule",
                "--kind", "object", "--size", "32", "--n_train", "2", "--n_test_good", "1",
                "--n_test_defect", "1"]
    done = subprocess.run(generate, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    path = "test_tipc/configs/KDAD_EfficientNetLite0/train_infer_python.txt"
    done = run_bash(["test_tipc/prepare.sh", path, "whole_train_whole_infer"], tree,
                    {"KDAD_MVTEC_ROOT": str(mvtec)})
    assert done.returncode == 0, done.stdout + done.stderr
    config = check_prepared(tree, path, "whole_train_whole_infer")
    assert config["expert"] == "efficientnet_lite0" and config["mvtec_img_size"] == 128
    trained_on = tree / config["dataset_root"] / "tipc_class"
    assert os.path.realpath(trained_on) == os.path.realpath(mvtec / "capsule")
