"""Logging to the console and to ``logs/<class>_*.log``."""

from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str, log_file: str = "", console: bool = True) -> logging.Logger:
    """A logger writing ``time message`` lines; ``log_file`` is appended to (earlier runs are kept)."""
    logger = logging.getLogger(f"kdad.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if console:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(formatter)
        logger.addHandler(stream)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger
