"""The auto_log benchmark report of ``tools/infer.py`` (issue 13, "the real auto_log").

* our logger's report is checked line by line against the format of AutoLog's ``AutoLogger.report``
  (LDOUBLEV/AutoLog, the package the TIPC logs are parsed against), written below as data;
* the runtime creates the logger before the warm-up and waits for upstream's memory sampler,
  logs each line once although Paddle has a root-logger handler, names the deployed model, passes the
  GPU id it runs on and reports the number of images as ``data_num``. A stand-in ``auto_log`` module
  that behaves like the real one (root logger, sampling queue) checks the runtime with either logger.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
import types
from typing import Any, Dict, List

import cv2
import numpy as np
import pytest

from kdad.deploy import runtime
from kdad.utils.autolog import AutoLogger, Times, report_logger, set_data_num

# --------------------------------------------------------------------------- the upstream format
# One entry per logger.info call of AutoLog's report(), in order. "P" is the identifier prefix:
# "[<identifier>]" or "" (each item line is "<P> <key>: <value>", so it starts with a space when
# there is no identifier). Values are regular expressions; units and misspellings are upstream's.
BLOCKS = [
    ("Env info", 22, 22),
    ("Paddle info", 22, 22),
    ("Conf info", 23, 23),
    ("Model info", 23, 22),
    ("Data info", 23, 23),
    ("Perf info", 23, 23),
]
NUM = r"-?\d+(\.\d+)?(e-?\d+)?"
BOOL_OR_NONE = r"(True|False|None)"
UPSTREAM_REPORT = [
    ("newline",),
    ("header", "Env info"),
    ("item", "OS_version", r".*"),
    ("item", "CUDA_version", r".*"),
    ("item", "CUDNN_version", r".*"),
    ("item", "drivier_version", r".*"),
    ("header", "Paddle info"),
    ("item", "paddle_version", r"\S+"),
    ("item", "paddle_commit", r"\S+"),
    ("item", "log_api_version", r"1\.0"),
    ("header", "Conf info"),
    ("item", "runtime_device", r"(cpu|gpu|None)"),
    ("item", "ir_optim", BOOL_OR_NONE),
    ("item", "enable_memory_optim", r"True"),
    ("item", "enable_tensorrt", BOOL_OR_NONE),
    ("item", "enable_mkldnn", BOOL_OR_NONE),
    ("item", "cpu_math_library_num_threads", r"(\d+|None)"),
    ("header", "Model info"),
    ("item", "model_name", r"\S+"),
    ("item", "precision", r"(fp32|fp16|int8)"),
    ("header", "Data info"),
    ("item", "batch_size", r"\d+"),
    ("item", "input_shape", r".+"),
    ("item", "data_num", r"\d+"),
    ("header", "Perf info"),
    ("raw", rf"cpu_rss\(MB\): {NUM}, gpu_rss\(MB\): ({NUM}|None), gpu_util: ({NUM}|None)%"),
    ("item", "total time spent(s)", NUM),
    ("raw", rf"preprocess_time\(ms\): {NUM}, inference_time\(ms\): {NUM}, postprocess_time\(ms\): {NUM}"),
]
# logging format of AutoLog's own logger: "[%(asctime)s] %(name)s %(levelname)s: %(message)s",
# date "%Y/%m/%d %H:%M:%S", logger name "root", level INFO for every report line
RECORD_PREFIX = r"\[\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}\] root INFO: "


def header_text(title: str) -> str:
    _, left, right = next(block for block in BLOCKS if block[0] == title)
    return f"{'-' * left} {title} {'-' * right}"


def expected_patterns(identifier: str = "") -> List[str]:
    """The report as regexes for the physical lines it prints (the first record is a newline)."""
    prefix = re.escape(f"[{identifier}]" if identifier else "")
    lines = []
    for entry in UPSTREAM_REPORT:
        if entry[0] == "newline":
            lines += [RECORD_PREFIX + "$", "^$"]  # message "\n": the prefix, then an empty line
        elif entry[0] == "header":
            lines.append(RECORD_PREFIX + re.escape(header_text(entry[1])) + "$")
        elif entry[0] == "item":
            lines.append(RECORD_PREFIX + prefix + " " + re.escape(entry[1]) + ": " + entry[2] + "$")
        else:
            lines.append(RECORD_PREFIX + prefix + " " + entry[1] + "$")
    return lines


def assert_upstream_format(text: str, identifier: str = "") -> List[str]:
    lines = text.rstrip("\n").split("\n")
    patterns = expected_patterns(identifier)
    assert len(lines) == len(patterns), "\n".join(lines)
    for number, (line, pattern) in enumerate(zip(lines, patterns)):
        assert re.match(pattern, line), f"line {number}: {line!r} does not match {pattern!r}"
    return lines


def report_block(out: str) -> str:
    """The report's physical lines out of a whole stdout (they start at the newline record)."""
    lines = out.split("\n")
    start = next(i for i, line in enumerate(lines) if re.match(RECORD_PREFIX + "$", line))
    return "\n".join(lines[start:start + len(expected_patterns())])


def value_of(lines: List[str], key: str) -> str:
    for line in lines:
        match = re.search(rf"(\[[^\]]*\])? {re.escape(key)}: (.*)$", line)
        if match and "root INFO" in line:
            return match.group(2)
    raise KeyError(key)


def fake_clock() -> Any:
    return iter(np.arange(0.0, 1000.0, 0.25)).__next__


def timed(times: Times, batches: int) -> None:
    for _ in range(batches):
        times.start()
        times.stamp()
        times.stamp()
        times.end(stamp=True)


# --------------------------------------------------------------------------- our logger's report


@pytest.mark.parametrize("identifier", ["", "KDAD"])
def test_report_matches_upstream_format_line_by_line(capsys, identifier) -> None:
    log = AutoLogger("kdad_vgg16_score", model_precision="fp32", batch_size=2, data_shape="[3, 64, 64]",
                     inference_config={"runtime_device": "cpu", "ir_optim": True, "enable_tensorrt": False,
                                       "enable_mkldnn": False, "cpu_math_library_num_threads": 2},
                     clock=fake_clock())
    timed(log.times, 3)
    log.report(identifier or None)
    lines = assert_upstream_format(capsys.readouterr().out, identifier)
    assert value_of(lines, "model_name") == "kdad_vgg16_score"
    assert value_of(lines, "data_num") == "3"  # batches, as upstream, unless set (see below)
    assert value_of(lines, "total time spent(s)") == "2.25"
    assert value_of(lines, "input_shape") == "[3, 64, 64]"
    assert lines[-1].endswith("preprocess_time(ms): 250.0, inference_time(ms): 250.0, "
                              "postprocess_time(ms): 250.0")


def test_report_printed_once_despite_a_root_handler(capsys) -> None:
    """Paddle puts a StreamHandler on the root logger; the report must not go through it too."""
    root = logging.getLogger()
    echo = logging.StreamHandler(sys.stdout)
    root.addHandler(echo)
    try:
        log = AutoLogger("m", inference_config=None, clock=fake_clock())
        timed(log.times, 1)
        log.report()
        log2 = AutoLogger("m", inference_config=None, clock=fake_clock())  # a second report: no stacking
        timed(log2.times, 1)
        log2.report()
    finally:
        root.removeHandler(echo)
    out = capsys.readouterr().out
    assert out.count("Env info") == 2 and out.count(" data_num: 1") == 2


def test_set_data_num_for_ours_and_upstream_times() -> None:
    times = Times(clock=fake_clock())
    timed(times, 2)
    set_data_num(times, 3)
    assert times._num_counts() == 3

    class UpstreamTimes:  # upstream's Times has no setting: _num_counts() counts end() calls
        total_time = [0.1, 0.1]

        def _num_counts(self) -> int:
            return len(self.total_time)

    other = UpstreamTimes()
    set_data_num(other, 3)
    assert other._num_counts() == 3


def test_report_logger_is_standalone(tmp_path) -> None:
    logger = report_logger(str(tmp_path / "logs" / "bench.log"))
    assert logger.name == "root" and logger is not logging.getLogger() and logger.parent is None
    logger.info("x")
    for handler in logger.handlers:
        handler.flush()
    assert re.match(RECORD_PREFIX + "x$", (tmp_path / "logs" / "bench.log").read_text().strip())


# --------------------------------------------------------------------------- the runtime with it


class FakeQueue:
    """The sampler queue of upstream's logger: empty until the child's first sample."""

    def __init__(self, empty_polls: int) -> None:
        self.empty_polls = empty_polls
        self.polls = 0

    def empty(self) -> bool:
        self.polls += 1
        return self.polls <= self.empty_polls


def fake_auto_log(events: List[str], created: List[Dict[str, Any]], empty_polls: int = 3) -> types.ModuleType:
    """An ``auto_log`` module behaving like the real one where it matters here: its logger is the
    real root logger with a stdout handler unless one is passed, and a sampler queue fills later."""
    module = types.ModuleType("auto_log")

    class UpstreamLikeAutoLogger:
        def __init__(self, model_name, model_precision, batch_size, data_shape, save_path,
                     inference_config=None, pids=None, process_name=None, gpu_ids=None,
                     time_keys=("preprocess_time", "inference_time", "postprocess_time"), warmup=0,
                     logger=None, **kwargs) -> None:
            events.append("logger")
            created.append(dict(model_name=model_name, gpu_ids=gpu_ids, logger=logger, batch_size=batch_size))
            self.model_name = model_name
            self.times = Times(list(time_keys), warmup=warmup)
            if logger is None:
                logger = logging.getLogger("root")
                handler = logging.StreamHandler(sys.stdout)
                handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
                logger.addHandler(handler)
                logger.setLevel(logging.DEBUG)
            self.logger = logger
            self.get_mem = types.SimpleNamespace(mem_q=FakeQueue(empty_polls))

        def report(self, identifier=None) -> None:
            events.append("report")
            self.logger.info(f" model_name: {self.model_name}")
            self.logger.info(f" data_num: {self.times._num_counts()}")

    module.AutoLogger = UpstreamLikeAutoLogger
    return module


class FakeConfig:
    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu

    def use_gpu(self) -> bool:
        return self.gpu

    def mkldnn_enabled(self) -> bool:
        return False

    def cpu_math_library_num_threads(self) -> int:
        return 1

    def ir_optim(self) -> bool:
        return True

    def tensorrt_engine_enabled(self) -> bool:
        return False


class FakeRunner:
    def __init__(self, events: List[str], model_file: str, gpu: bool = False) -> None:
        self.events = events
        self.config = FakeConfig(gpu)
        self.model_file = model_file

    def run(self, batch: np.ndarray) -> List[np.ndarray]:
        self.events.append(f"run{batch.shape[0]}")
        return [np.full(batch.shape[0], 0.25, dtype=np.float32)]


DEPLOY = {"kind": "score", "input": {"shape": [-1, 3, 16, 16]}, "engine": {"onednn": True},
          "postprocess": {"threshold": 0.5}, "outputs": [{"name": "fetch_name_0"}],
          "model_info": {"method": "kdad", "backbone": "vgg16", "expert": "vgg16"}}


@pytest.fixture
def images(tmp_path) -> str:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    return str(folder)


def run_infer(monkeypatch, tmp_path, images, events, gpu=False, deploy=None) -> Dict[str, Any]:
    model_file = str(tmp_path / "export" / "score" / "model.json")
    monkeypatch.setattr(runtime, "load_paddle_model",
                        lambda *args, **kwargs: (FakeRunner(events, model_file, gpu), dict(deploy or DEPLOY)))
    args = runtime.build_parser().parse_args([f"--input_file={images}", "--batch_size=2",
                                              "--enable_benchmark=True", f"--save_dir={tmp_path / 'out'}"])
    return runtime.run(args)


def test_logger_created_before_warmup_and_sampler_awaited(monkeypatch, tmp_path, images, capsys) -> None:
    events: List[str] = []
    created: List[Dict[str, Any]] = []
    module = fake_auto_log(events, created, empty_polls=3)
    monkeypatch.setitem(sys.modules, "auto_log", module)
    monkeypatch.setattr(time, "sleep", lambda seconds: events.append("wait"))
    run_infer(monkeypatch, tmp_path, images, events)
    # logger, its sampler's start awaited, the untimed warm-up (batch 2), then the 3 images in 2 batches
    assert events == ["logger", "wait", "wait", "wait", "run2", "run2", "run1", "report"]


def test_runtime_logger_args_and_single_lines(monkeypatch, tmp_path, images, capsys) -> None:
    events: List[str] = []
    created: List[Dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "auto_log", fake_auto_log(events, created, empty_polls=0))
    root = logging.getLogger()
    paddle_like = logging.StreamHandler(sys.stdout)  # Paddle's root handler (on stderr in Paddle)
    root.addHandler(paddle_like)
    try:
        run_infer(monkeypatch, tmp_path, images, events)
        run_infer(monkeypatch, tmp_path, images, events, gpu=True)
    finally:
        root.removeHandler(paddle_like)
    out = capsys.readouterr().out
    assert out.count(" data_num: ") == 2  # one line per report: no echo through the root logger
    assert out.count(" model_name: kdad_vgg16_score") == 2
    assert out.count(" data_num: 3") == 2  # images, not the 2 batches
    assert created[0]["model_name"] == "kdad_vgg16_score"
    assert created[0]["gpu_ids"] is None and created[1]["gpu_ids"] == 0  # the device the config uses
    logger = created[0]["logger"]
    assert logger is not None and logger is not root and logger.parent is None


def test_runtime_with_our_logger(monkeypatch, tmp_path, images, capsys) -> None:
    monkeypatch.setitem(sys.modules, "auto_log", None)  # not installed: kdad.utils.autolog
    events: List[str] = []
    output = run_infer(monkeypatch, tmp_path, images, events)
    assert output["summary"]["images_scored"] == 3
    lines = assert_upstream_format(report_block(capsys.readouterr().out))
    assert value_of(lines, "model_name") == "kdad_vgg16_score"
    assert value_of(lines, "data_num") == "3"
    assert value_of(lines, "batch_size") == "2"
    assert value_of(lines, "input_shape") == "[3, 16, 16]"


@pytest.mark.parametrize("deploy, path, expected", [
    (DEPLOY, None, "kdad_vgg16_score"),
    ({"kind": "anomaly_map", "model_info": {"method": "padim", "backbone": "resnet18"}}, None,
     "padim_resnet18_anomaly_map"),
    ({"kind": "score"}, "/x/exports/my_model/model.json", "my_model"),
    (None, None, "KDAD"),
])
def test_autolog_model_name(deploy, path, expected, tmp_path) -> None:
    assert runtime.autolog_model_name(deploy, path) == expected


def test_wait_for_memory_sampler_times_out(monkeypatch, capsys) -> None:
    clock = iter(np.arange(0.0, 100.0, 1.0)).__next__
    monkeypatch.setattr(time, "monotonic", clock)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    never = types.SimpleNamespace(get_mem=types.SimpleNamespace(mem_q=FakeQueue(10**9)))
    assert runtime.wait_for_memory_sampler(never, timeout=5) is False
    assert "did not start" in capsys.readouterr().err
    assert runtime.wait_for_memory_sampler(object()) is True  # ours has no sampler


def test_report_through_a_given_logger() -> None:
    stream = io.StringIO()
    logger = logging.Logger("root")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                                           datefmt="%Y/%m/%d %H:%M:%S"))
    logger.addHandler(handler)
    log = AutoLogger("m", inference_config=None, logger=logger, clock=fake_clock())
    timed(log.times, 2)
    log.report()
    assert_upstream_format(stream.getvalue())
