"""The console: progress, results and real warnings only; Paddle's known noise and the config dump in
the log file; ``--verbose`` shows everything; the tools run from any working directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_CCACHE = shutil.which("ccache") is None  # Paddle warns about it on import only when it is missing
NOISE = ("ccache", "'place' interface", "ReduceMeanCheckIfOneDNNSupport", "Skip loading for",
         "always track global mean", "UserWarning")


def _run(args: List[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "KDAD_VERBOSE"}
    return subprocess.run([sys.executable, *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=env)


def _noise(text: str) -> List[str]:
    """Lines of known Paddle noise, and Paddle's C++ log lines (``W1130 01:02:03.456 ...``)."""
    return [line for line in text.splitlines() if any(word in line for word in NOISE)
            or re.match(r"[IW]\d{4} \d\d:\d\d:\d\d", line)]


@pytest.fixture
def quiet():
    from kdad.utils import quiet

    quiet.set_verbose(False)
    yield quiet
    quiet.set_verbose(False)


@pytest.mark.parametrize("tool", ["tools/infer.py", "tools/predict.py", "tools/train.py",
                                  "deploy/onnx/infer_onnx.py"])
def test_help_is_quiet_from_any_directory(tool: str, tmp_path: Path) -> None:
    done = _run([str(ROOT / tool), "--help"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--verbose" in done.stdout
    assert done.stderr == "", done.stderr[-2000:]


@pytest.mark.skipif(not NO_CCACHE, reason="ccache is installed here, so Paddle has no import warning to show")
def test_verbose_shows_paddles_import_warning(tmp_path: Path) -> None:
    done = _run([str(ROOT / "tools" / "infer.py"), "--help", "--verbose"], tmp_path)
    assert done.returncode == 0 and "No ccache found" in done.stderr


def test_known_noise_goes_to_the_log_file_real_warnings_stay(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "run.log"
    script = textwrap.dedent(f"""
        import sys, warnings
        import kdad
        import paddle  # Paddle's import warning (no ccache) comes before any log file exists
        from kdad.utils.logger import get_logger
        log = get_logger("console_test", {str(log_file)!r})
        for _ in range(3):
            warnings.warn("Tensor do not have 'place' interface for pir graph mode, try not to use it.")
        warnings.warn("Skip loading for cloner.x. shape mismatch")
        warnings.warn("a real problem the user must see")
        log.info("config:\\nbatch_size: 8\\nseed: 42")
        log.info("epoch 0 loss 1.0")
    """)
    quiet_run = _run(["-c", script], tmp_path)
    assert quiet_run.returncode == 0, quiet_run.stderr[-2000:]
    assert "a real problem the user must see" in quiet_run.stderr
    real = [line for line in quiet_run.stderr.splitlines() if "a real problem" in line]
    assert _noise(quiet_run.stdout + quiet_run.stderr) == real
    assert "epoch 0 loss 1.0" in quiet_run.stdout and "config:" not in quiet_run.stdout
    log = log_file.read_text()
    assert "'place' interface" in log and "Skip loading for" in log
    assert "config:\nbatch_size: 8\nseed: 42" in log and "epoch 0 loss 1.0" in log
    if NO_CCACHE:
        assert "No ccache found" in log

    verbose_run = _run(["-c", script, "--verbose"], tmp_path)
    assert "'place' interface" in verbose_run.stderr and "Skip loading for" in verbose_run.stderr
    assert "config:" in verbose_run.stdout


def test_config_dump_only_in_the_log_file(tmp_path: Path, capsys: pytest.CaptureFixture, quiet) -> None:
    from kdad.utils.logger import get_logger

    log = get_logger("console_dump", str(tmp_path / "train.log"))
    log.info("config:\nlamda: 0.5")
    log.info("file only", extra={"file_only": True})
    log.info("epoch 3 loss 0.25")
    out = capsys.readouterr().out
    assert "epoch 3 loss 0.25" in out and "config:" not in out and "file only" not in out
    quiet.set_verbose(True)
    log.info("config:\nlamda: 0.7")
    assert "lamda: 0.7" in capsys.readouterr().out
    text = (tmp_path / "train.log").read_text()
    assert "lamda: 0.5" in text and "file only" in text and "lamda: 0.7" in text


def test_native_noise_filter(capfd: pytest.CaptureFixture, quiet) -> None:
    with quiet.native_stdout_filtered():
        os.write(1, b"ReduceMeanCheckIfOneDNNSupport\nkept native line\n")
        print("kept python line")
    out = capfd.readouterr().out
    assert "kept native line" in out and "kept python line" in out and "ReduceMean" not in out
    quiet.set_verbose(True)
    with quiet.native_stdout_filtered():
        os.write(1, b"ReduceMeanCheckIfOneDNNSupport\n")
    assert "ReduceMean" in capfd.readouterr().out


def test_train_export_infer_console(tmp_path: Path) -> None:
    """The whole chain from another working directory: no Paddle noise on the console (no config
    dump, no 'place' warnings of the export, no oneDNN lines of Paddle Inference), results shown."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    data, out, export = tmp_path / "data", tmp_path / "out", tmp_path / "export"
    steps = {
        "data": ["-m", "kdad.data.synthetic", "--root", str(data), "--category", "tex", "--n_train", "12",
                 "--n_test_good", "2", "--n_test_defect", "1", "--size", "32"],
        "train": [str(ROOT / "tools" / "train.py"), "--dataset_root", str(data), "--normal_class", "tex",
                  "--save_dir", str(out), "-o", "pretrain=False", "-o", "num_epochs=1", "-o", "batch_size=8",
                  "-o", "mvtec_img_size=32", "-o", "holdout_fraction=0.25", "-o", "progress_bar=False",
                  "-o", f"log_dir={tmp_path / 'logs'}"],
        "export": [str(ROOT / "tools" / "export_model.py"), "--model_path",
                   str(out / "tex" / "model_final.pdparams"), "--save_dir", str(export)],
        "infer": [str(ROOT / "tools" / "infer.py"), f"--model_dir={export / 'score'}", "--enable_mkldnn=True",
                  f"--input_file={data / 'tex' / 'test'}", f"--save_dir={tmp_path / 'infer'}"],
    }
    consoles = {}
    for name, args in steps.items():
        done = _run(args, work)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        consoles[name] = done
        assert _noise(done.stdout + done.stderr) == [], f"{name} console: {_noise(done.stdout + done.stderr)}"
    assert "config:" not in consoles["train"].stdout and "final model:" in consoles["train"].stdout
    assert "config:\n" in (tmp_path / "logs" / "tex_train.log").read_text()
    assert "scored 4 of 4 images" in consoles["infer"].stdout and "OK/NG" not in consoles["infer"].stderr
    assert list(work.iterdir()) == []  # nothing written relative to the working directory
