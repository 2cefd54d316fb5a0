"""Logging to the console and to ``logs/<class>_*.log``.

The log file gets everything. The console shows progress and results: records logged with
``extra={"file_only": True}`` and the training configuration dump (a message starting with
``"config:\\n"``) go to the log file only, unless ``--verbose`` (:mod:`kdad.utils.quiet`). Paddle's
known noisy warnings, kept off the console by :mod:`kdad.utils.quiet`, are written to the log file.
"""

from __future__ import annotations

import logging
import os
import sys

from kdad.utils import quiet

FILE_ONLY_PREFIXES = ("config:\n",)


class ConsoleFilter(logging.Filter):
    """Keeps file-only records (see the module docstring) off the console unless verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if quiet.is_verbose():
            return True
        if getattr(record, "file_only", False):
            return False
        return not str(record.msg).startswith(FILE_ONLY_PREFIXES)


def get_logger(name: str, log_file: str = "", console: bool = True) -> logging.Logger:
    """A logger writing ``time message`` lines; ``log_file`` is appended to (earlier runs are kept)."""
    logger = logging.getLogger(f"kdad.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        quiet.detach_log_file(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if console:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(formatter)
        stream.addFilter(ConsoleFilter())
        logger.addHandler(stream)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        quiet.attach_log_file(handler)
    return logger
