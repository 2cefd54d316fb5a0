"""Command-line plumbing shared by the thin scripts in ``tools/``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional

from kdad.config import ConfigError, load_config, parse_overrides
from kdad.utils import quiet


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", default=None, help="YAML config (e.g. configs/config.yaml)")
    parser.add_argument("--dataset_root", default=None, help="folder holding <normal_class>/")
    parser.add_argument("--normal_class", default=None, help="class trained as normal")
    parser.add_argument("--save_dir", default=None, help="checkpoints go to <save_dir>/<normal_class>/")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. -o num_epochs=10 (repeatable)")
    quiet.add_verbose_argument(parser)
    return parser


def config_from_args(args: argparse.Namespace, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    overrides = parse_overrides(args.override)
    for key in ("dataset_root", "normal_class", "save_dir"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def run_main(main: Callable[[List[str]], int]) -> None:
    """Run ``main`` and turn expected errors into one clear line and exit code 2, Ctrl-C into one
    line and exit code 130 (no traceback)."""
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, FileNotFoundError, ValueError, NotADirectoryError, IsADirectoryError,
            PermissionError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:
        print(f"{error}" if str(error) else "interrupted", file=sys.stderr)
        sys.exit(130)
