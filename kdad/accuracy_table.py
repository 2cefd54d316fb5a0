"""Compare our per-class MVTec AD results with the KDAD paper's published numbers.

Reads every ``<log_dir>/<class>_val.log`` (one ``key: value`` per line, metrics as fractions in
[0, 1], as written by ``tools/test.py``) and prints markdown tables in the paper's layout: the
classes as columns in the paper's order, ``Mean`` last, a ``Paper`` row (from
``kdad/resources/paper_reference.yaml``) and an ``Ours`` row, for detection (image AUROC %) and
localization (the paper's protocol, %). Standard metrics (pixel AUROC, AUPRO, best image F1) follow
in a table of their own, and classes the paper does not report (e.g. ``magnetic_tile``) in another.

With ``--tolerance T`` (percentage points) the exit code is 1 when a class is below the paper by
more than ``T`` in detection or localization, 0 otherwise; 2 on a usage or file error.

    python tools/accuracy_table.py --log_dir logs --tolerance 2.0
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

REFERENCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources",
                              "paper_reference.yaml")
VAL_LOG_SUFFIX = "_val.log"
# Metrics read from the val logs (fractions in [0, 1]).
METRIC_KEYS = ("image_auroc", "paper_localization_auc", "pixel_auroc", "aupro", "image_f1_max")
# (reference section, val log key, table title)
COMPARED = (
    ("detection", "image_auroc", "Detection (image AUROC %)"),
    ("localization", "paper_localization_auc", "Localization (KDAD paper protocol %)"),
)
STANDARD_ROWS = (
    ("pixel_auroc", "Pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_f1_max", "Image F1 max"),
)
OTHER_ROWS = (
    ("image_auroc", "Image AUROC"),
    ("paper_localization_auc", "Localization (paper protocol)"),
) + STANDARD_ROWS


class AccuracyTableError(ValueError):
    """A missing or malformed log or reference file."""


def load_reference(path: str = REFERENCE_PATH) -> Dict:
    """The paper's numbers: ``order``, ``display`` and per-section ``classes`` (percent)."""
    if not os.path.isfile(path):
        raise AccuracyTableError(f"paper reference file '{path}' does not exist")
    with open(path, encoding="utf-8") as handle:
        reference = yaml.safe_load(handle)
    for key in ("order", "display", "detection", "localization"):
        if not isinstance(reference, dict) or key not in reference:
            raise AccuracyTableError(f"paper reference file '{path}' has no '{key}'")
    return reference


def read_val_log(path: str) -> Dict[str, float]:
    """The metrics of one val log (``key: value`` lines); other keys are ignored."""
    metrics: Dict[str, float] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if ":" not in line:
                raise AccuracyTableError(f"{path}: line {number} is not of the form 'key: value': {line!r}")
            key, value = (part.strip() for part in line.split(":", 1))
            if key not in METRIC_KEYS:
                continue
            try:
                number_value = float(value)
            except ValueError:
                message = f"{path}: line {number}: '{key}' is not a number: {value!r}"
                raise AccuracyTableError(message) from None
            if not 0.0 <= number_value <= 1.0:
                raise AccuracyTableError(
                    f"{path}: line {number}: '{key}' is {number_value}, expected a fraction in [0, 1]"
                )
            metrics[key] = number_value
    return metrics


def collect(log_dir: str) -> Dict[str, Dict[str, float]]:
    """``{class: metrics}`` from every ``<log_dir>/<class>_val.log``."""
    if not os.path.isdir(log_dir):
        raise AccuracyTableError(f"log folder '{log_dir}' does not exist")
    paths = sorted(glob.glob(os.path.join(log_dir, "*" + VAL_LOG_SUFFIX)))
    if not paths:
        raise AccuracyTableError(f"no *{VAL_LOG_SUFFIX} files in '{log_dir}' (run tools/test.py first)")
    return {os.path.basename(p)[: -len(VAL_LOG_SUFFIX)]: read_val_log(p) for p in paths}


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def markdown_table(
    columns: Sequence[str], rows: Sequence[Tuple[str, Sequence[Optional[float]]]], corner: str = "Method"
) -> str:
    """``| corner | c1 | ... |`` with one line per ``(label, values)`` row (``None`` prints ``-``)."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(lines)


def _percent(metrics: Mapping[str, float], key: str) -> Optional[float]:
    return 100.0 * metrics[key] if key in metrics else None


def build_report(
    results: Mapping[str, Mapping[str, float]],
    reference: Mapping,
    tolerance: float = 2.0,
    all_classes: bool = False,
) -> Tuple[str, List[str]]:
    """The markdown report and the list of classes below the paper by more than ``tolerance``."""
    order = list(reference["order"])
    display = reference["display"]
    known = [c for c in order if c in results]
    shown = order if all_classes else known
    other = sorted(c for c in results if c not in order)
    parts: List[str] = []
    failures: List[str] = []

    if shown:
        columns = [display[c] for c in shown] + ["Mean"]
        for section, key, title in COMPARED:
            paper = reference[section]["classes"]
            ours = [_percent(results[c], key) if c in results else None for c in shown]
            counted = [c for c, v in zip(shown, ours) if v is not None]
            # Both means over the classes we have a result for, so that they are comparable.
            paper_row = [float(paper[c]) for c in shown] + [_mean([float(paper[c]) for c in counted])]
            ours_row = ours + [_mean(ours)]
            table = markdown_table(columns, [("Paper", paper_row), ("Ours", ours_row)])
            parts.append(f"### {title}\n\n{table}")
            if 0 < len(counted) < len(order):
                parts.append(f"Mean over the {len(counted)} of {len(order)} classes with a result.")
            for c, value in zip(shown, ours):
                if value is not None and float(paper[c]) - value > tolerance + 1e-9:
                    failures.append(
                        f"{c} {section}: {value:.2f} is {float(paper[c]) - value:.2f} points below the "
                        f"paper's {float(paper[c]):.2f} (tolerance {tolerance:.2f})"
                    )
        standard = []
        for key, label in STANDARD_ROWS:
            values = [_percent(results[c], key) if c in results else None for c in shown]
            if any(v is not None for v in values):
                standard.append((label, values + [_mean(values)]))
        if standard:
            parts.append("### Standard metrics (ours, %; not reported by the paper)\n\n"
                         + markdown_table(columns, standard, corner="Metric"))

    if other:
        rows = []
        for key, label in OTHER_ROWS:
            values = [_percent(results[c], key) for c in other]
            if any(v is not None for v in values):
                rows.append((label, values + [_mean(values)]))
        table = markdown_table(other + ["Mean"], rows, corner="Metric")
        parts.append(f"### Other classes (ours, %; no paper reference)\n\n{table}")

    if failures:
        parts.append(f"Below the paper by more than {tolerance:.2f} points:\n"
                     + "\n".join(f"- {line}" for line in failures))
    elif known:
        parts.append(f"All {len(known)} classes with a paper reference are within {tolerance:.2f} points "
                     "of the paper (or above it).")
    return "\n\n".join(parts) + "\n", failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log_dir", default="logs", help="folder holding <class>_val.log files")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="percentage points a class may fall below the paper (exit code 1 beyond)")
    parser.add_argument("--all_classes", action="store_true",
                        help="show all 15 MVTec classes, '-' for those without a log")
    parser.add_argument("--reference", default=REFERENCE_PATH, help="YAML with the paper's numbers")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tolerance < 0:
            raise AccuracyTableError(f"--tolerance must be >= 0, got {args.tolerance}")
        report, failures = build_report(collect(args.log_dir), load_reference(args.reference),
                                        args.tolerance, args.all_classes)
    except (AccuracyTableError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report, end="")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
