"""A quiet console: progress, results and real warnings; Paddle's known noise only in the log file.

Installed by ``import kdad`` (before Paddle is imported, so its import-time warnings are caught).
What is hidden from the console by default, and where it goes instead:

* Python warnings whose text matches :data:`NOISY_WARNINGS` (Paddle's "No ccache found" on import,
  "Tensor do not have 'place' interface" dozens of times per export, "Skip loading for ...",
  the BatchNorm "we now always track global mean and variance" note): logged to the ``kdad.suppressed``
  logger, which writes into the log file last opened by :func:`kdad.utils.logger.get_logger` (those
  emitted before a log file exists wait for the first one). Every other warning is shown as usual.
* native (C++) lines that Paddle Inference prints to stdout on a predictor's first run, matching
  :data:`NOISY_NATIVE_LINES` (oneDNN's "ReduceMeanCheckIfOneDNNSupport"): see
  :func:`native_stdout_filtered`.
* the configuration dump of training: console filter of :func:`kdad.utils.logger.get_logger`.
* Paddle's C++ (glog) INFO and WARNING lines, e.g. "W... Paddle static graph(PIR) not support input out
  tensor" on export: ``GLOG_minloglevel=2`` is set before Paddle is imported (unless verbose, or the
  variable is set already); errors are still shown. These lines are not in the log file either.

``--verbose`` (every tool, :func:`add_verbose_argument`) or the environment variable
``KDAD_VERBOSE=1`` shows everything again. ``--verbose`` is also read from ``sys.argv`` when kdad is
imported, so the warnings of Paddle's import are shown too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Any, Iterator, List, Optional, Sequence

#: Python warnings of Paddle that say nothing about the user's run (regular expressions)
NOISY_WARNINGS = (
    r"No ccache found",
    r"(Tensor|Variable) do not have 'place' interface",
    r"Skip loading for",
    r"When training, we now always track global mean and variance",
)
#: lines printed by Paddle's C++ code (whole lines, regular expressions)
NOISY_NATIVE_LINES = (r"ReduceMeanCheckIfOneDNNSupport",)

SUPPRESSED_LOGGER = "kdad.suppressed"

_noise = re.compile("|".join(f"(?:{p})" for p in NOISY_WARNINGS))
_native_noise = re.compile("|".join(f"(?:{p})" for p in NOISY_NATIVE_LINES))
_state: dict = {"verbose": False, "installed": False, "original": None}
_pending: List[str] = []  # suppressed before any log file was attached
_log = logging.getLogger(SUPPRESSED_LOGGER)
_log.propagate = False
_log.setLevel(logging.INFO)


def verbose_requested(argv: Optional[Sequence[str]] = None) -> bool:
    """``--verbose`` on the command line or ``KDAD_VERBOSE`` set to 1/true/yes."""
    if os.environ.get("KDAD_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return "--verbose" in (sys.argv[1:] if argv is None else argv)


def is_verbose() -> bool:
    return bool(_state["verbose"])


def set_verbose(flag: bool) -> None:
    """Show (True) or hide (False, the default) the known noise from now on."""
    _state["verbose"] = bool(flag)


def is_noise(message: str) -> bool:
    """Whether a warning text is one of Paddle's known noisy warnings."""
    return bool(_noise.search(str(message)))


def _record(text: str) -> None:
    if _log.handlers:
        _log.info(text)
    elif len(_pending) < 1000:
        _pending.append(text)


def _showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                 line: Optional[str] = None) -> None:
    if not _state["verbose"] and is_noise(str(message)):
        _record(f"(suppressed on the console) {category.__name__}: {message} [{filename}:{lineno}]")
        return
    _state["original"](message, category, filename, lineno, file, line)


def install(verbose: Optional[bool] = None) -> None:
    """Route Python warnings through the noise filter (idempotent); ``verbose`` None: from argv/env."""
    _state["verbose"] = verbose_requested() if verbose is None else bool(verbose)
    if not _state["verbose"] and "paddle" not in sys.modules:
        os.environ.setdefault("GLOG_minloglevel", "2")
    if _state["installed"]:
        return
    _state["original"] = warnings.showwarning
    warnings.showwarning = _showwarning
    _state["installed"] = True


def attach_log_file(handler: logging.Handler) -> None:
    """Write the suppressed messages to ``handler`` (the current run's log file, replacing an earlier
    one), starting with those held back before any log file existed."""
    for old in list(_log.handlers):
        _log.removeHandler(old)
    _log.addHandler(handler)
    while _pending:
        _log.info(_pending.pop(0))


def detach_log_file(handler: logging.Handler) -> None:
    if handler in _log.handlers:
        _log.removeHandler(handler)


class _VerboseAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, True)
        set_verbose(True)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: show Paddle's own warnings, native log lines and the config dump on the console."""
    parser.add_argument("--verbose", action=_VerboseAction,
                        help="show everything on the console: Paddle's own warnings and messages and the "
                             "training config dump (by default they go to the log file only)")


def _flush_native() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library handle (e.g. Windows): nothing to flush
        pass


@contextlib.contextmanager
def native_stdout_filtered() -> Iterator[None]:
    """Capture what native code writes to file descriptor 1 inside the block, then write the lines
    that are not :data:`NOISY_NATIVE_LINES` to ``sys.stdout`` (the others go to the log file).

    For short blocks only (a predictor's first run): the output is held until the block ends.
    """
    if _state["verbose"]:
        yield
        return
    try:
        sys.stdout.flush()
        fd = 1
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        _flush_native()
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            _flush_native()
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = []
            for line in text.splitlines(keepends=True):
                if _native_noise.search(line):
                    _record(f"(suppressed on the console) native output: {line.rstrip()}")
                else:
                    kept.append(line)
            if kept:
                sys.stdout.write("".join(kept))
                sys.stdout.flush()
