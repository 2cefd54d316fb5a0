"""Compare our per-class MVTec AD results with published numbers, per method and backbone.

Reads the val logs written by ``tools/test.py`` (one ``key: value`` per line; metrics as fractions in
[0, 1], the other lines as text): KDAD's ``<log_dir>/<class>_val.log`` and the other methods'
``<log_dir>/<method>/<class>_val.log``. A flat folder of mixed logs works too: a log's ``method:`` line
says whose it is (without one: KDAD at the top level, the folder's name in a subfolder). Logs are grouped
by (method, backbone), one report each, as markdown tables with the classes as columns in the papers'
order and ``Mean`` last:

* KDAD (``kdad/resources/paper_reference.yaml``, VGG16 expert): a ``Paper`` and an ``Ours`` row for
  detection (image AUROC %) and localization (the paper's protocol, %), then the standard metrics.
* Other methods (``kdad/resources/<method>_reference.yaml``): anomalib's per-class image and pixel AUROC
  for the backbones it reports, and the papers' means of the 15 classes (image AUROC, pixel AUROC, PRO).

A reference is compared only with logs of its own backbone; for another backbone (e.g.
``efficientnet_lite0``) its rows are shown labelled with their backbone, marked "different backbone: not
compared". Classes without a reference (e.g. ``magnetic_tile``) get a table of their own.

With ``--tolerance T`` (percentage points) the exit code is 1 when a compared class (or, once all 15
classes have a result, a compared paper mean) is below its reference by more than ``T``, 0 otherwise;
2 on a usage or file error.

    python tools/accuracy_table.py --log_dir logs --tolerance 2.0 [--method padim]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

RESOURCES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources")
REFERENCE_PATH = os.path.join(RESOURCES_DIR, "paper_reference.yaml")
VAL_LOG_SUFFIX = "_val.log"
KDAD = "kdad"
# The expert of a KDAD log that names neither a backbone nor an expert (the config default).
KDAD_DEFAULT_BACKBONE = "vgg16"
UNKNOWN_BACKBONE = "unknown"
# Metrics read from the val logs (fractions in [0, 1]); every other line is kept as text.
METRIC_KEYS = ("image_auroc", "paper_localization_auc", "pixel_auroc", "aupro", "image_f1_max")
# Per-class reference metrics: val log key -> (word in failure lines, table title).
SECTIONS: Dict[str, Tuple[str, str]] = {
    "image_auroc": ("detection", "Detection (image AUROC %)"),
    "paper_localization_auc": ("localization", "Localization (KDAD paper protocol %)"),
    "pixel_auroc": ("localization", "Localization (pixel AUROC %)"),
}
STANDARD_ROWS = (
    ("pixel_auroc", "Pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_f1_max", "Image F1 max"),
)
OTHER_ROWS = (
    ("image_auroc", "Image AUROC"),
    ("paper_localization_auc", "Localization (paper protocol)"),
) + STANDARD_ROWS
# Columns of the paper-means table: val log key -> label (the papers' PRO is our AUPRO).
MEAN_COLUMNS = (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC"), ("aupro", "PRO (AUPRO)"))
SCALES = {"fraction": 100.0, "percent": 1.0}


class AccuracyTableError(ValueError):
    """A missing or malformed log or reference file."""


@dataclass(frozen=True)
class ValLog:
    """One val log: every line as text, the metrics as fractions, and whose result it is."""

    path: str
    fields: Mapping[str, str]
    metrics: Mapping[str, float]
    method: str
    backbone: str
    class_name: str


@dataclass(frozen=True)
class ClassReference:
    """Per-class numbers (percent) of one source for one backbone: ``{log key: {class: value}}``."""

    label: str
    noun: str  # how a failure line names it ("the paper", "anomalib")
    backbone: Optional[str]  # None: the source does not say (never compared)
    source: str
    metrics: Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class MeanReference:
    """A published mean of the MVTec AD classes (percent; ``None``: not reported)."""

    label: str
    backbone: Optional[str]
    source: str
    values: Mapping[str, Optional[float]]
    compare: bool = True


@dataclass(frozen=True)
class MethodReference:
    """What one method's results are compared with, and how its report words it."""

    method: str
    name: str
    order: Sequence[str]
    display: Mapping[str, str]
    per_class: Sequence[ClassReference] = ()
    means: Sequence[MeanReference] = ()
    kind: str = "per-class"  # "All N classes with a <kind> reference ..."
    noun: str = "the reference"  # "Below <noun> by more than ..."
    standard_note: str = "no per-class reference"
    missing: Optional[str] = None  # why there is no reference at all

    @property
    def sections(self) -> List[str]:
        """The val log keys with per-class reference numbers, in table order."""
        return [key for key in SECTIONS if any(key in table.metrics for table in self.per_class)]


def _backbone_name(backbone: Optional[str]) -> str:
    return backbone if backbone else "backbone not stated"


def _matches(reference_backbone: Optional[str], backbone: str) -> bool:
    return reference_backbone is not None and reference_backbone == backbone


def load_reference(path: str = REFERENCE_PATH) -> Dict:
    """The KDAD paper's numbers: ``order``, ``display`` and per-section ``classes`` (percent)."""
    if not os.path.isfile(path):
        raise AccuracyTableError(f"paper reference file '{path}' does not exist")
    with open(path, encoding="utf-8") as handle:
        reference = yaml.safe_load(handle)
    for key in ("order", "display", "detection", "localization"):
        if not isinstance(reference, dict) or key not in reference:
            raise AccuracyTableError(f"paper reference file '{path}' has no '{key}'")
    return reference


def kdad_reference(reference: Mapping) -> MethodReference:
    """KDAD's :class:`MethodReference` from :func:`load_reference`'s dictionary."""
    try:
        metrics = {
            "image_auroc": {c: float(v) for c, v in reference["detection"]["classes"].items()},
            "paper_localization_auc": {c: float(v) for c, v in reference["localization"]["classes"].items()},
        }
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise AccuracyTableError(f"paper reference: malformed 'classes' ({error})") from None
    paper = ClassReference(label="Paper", noun="the paper",
                           backbone=str(reference.get("backbone", KDAD_DEFAULT_BACKBONE)),
                           source=str(reference.get("source", "")), metrics=metrics)
    return MethodReference(method=KDAD, name="KDAD", order=list(reference["order"]),
                           display=dict(reference["display"]), per_class=(paper,), kind="paper",
                           noun="the paper", standard_note="not reported by the paper")


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _optional_str(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def load_method_reference(method: str, reference_dir: str, kdad: Mapping) -> MethodReference:
    """``<reference_dir>/<method>_reference.yaml`` (columns as in ``kdad``, the KDAD reference);
    a method without a file gets an empty reference (all its classes are then "other classes")."""
    order, display = list(kdad["order"]), dict(kdad["display"])
    path = os.path.join(reference_dir, f"{method}_reference.yaml")
    if not os.path.isfile(path):
        return MethodReference(method=method, name=method, order=order, display=display,
                               missing=f"No reference numbers for method '{method}' (no {path}).")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict) or data.get("method") != method:
        raise AccuracyTableError(f"'{path}' is not the reference of method '{method}' "
                                 f"(no 'method: {method}')")
    try:
        per_class = []
        for entry in data.get("per_class") or []:
            if entry.get("scale", "percent") not in SCALES:
                raise ValueError(f"scale must be one of {sorted(SCALES)}, got {entry.get('scale')!r}")
            factor = SCALES[entry.get("scale", "percent")]
            metrics = {key: {c: round(factor * float(v), 6) for c, v in entry[key]["classes"].items()}
                       for key in SECTIONS if key in entry}
            per_class.append(ClassReference(label=str(entry["label"]), noun=str(entry["label"]),
                                            backbone=_optional_str(entry["backbone"]),
                                            source=str(entry["source"]),
                                            metrics=metrics))
        means = [MeanReference(label=str(entry["label"]), backbone=_optional_str(entry["backbone"]),
                               source=str(entry["source"]),
                               values={key: _optional_float(entry.get(key)) for key, _ in MEAN_COLUMNS},
                               compare=bool(entry.get("compare", True)))
                 for entry in data.get("paper_means") or []]
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise AccuracyTableError(f"{path}: malformed reference ({error!r})") from None
    return MethodReference(method=method, name=str(data.get("name", method)), order=order, display=display,
                           per_class=tuple(per_class), means=tuple(means))


def read_val_log(path: str, default_method: str = KDAD) -> ValLog:
    """One val log: metrics (``METRIC_KEYS``) as floats, every other line as text. A log without a
    ``method:`` line is ``default_method``'s; KDAD's backbone is its expert when not named."""
    fields: Dict[str, str] = {}
    metrics: Dict[str, float] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if ":" not in line:
                raise AccuracyTableError(f"{path}: line {number} is not of the form 'key: value': {line!r}")
            key, value = (part.strip() for part in line.split(":", 1))
            fields[key] = value
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
    method = fields.get("method") or default_method
    backbone = fields.get("backbone")
    if not backbone:
        backbone = (fields.get("expert") or KDAD_DEFAULT_BACKBONE) if method == KDAD else UNKNOWN_BACKBONE
    class_name = fields.get("class") or os.path.basename(path)[: -len(VAL_LOG_SUFFIX)]
    return ValLog(path=path, fields=fields, metrics=metrics, method=method, backbone=backbone,
                  class_name=class_name)


def collect(log_dir: str) -> List[ValLog]:
    """Every ``<log_dir>/*_val.log`` and ``<log_dir>/<folder>/*_val.log`` (hidden folders skipped)."""
    if not os.path.isdir(log_dir):
        raise AccuracyTableError(f"log folder '{log_dir}' does not exist")
    logs = [read_val_log(p) for p in sorted(glob.glob(os.path.join(log_dir, "*" + VAL_LOG_SUFFIX)))]
    for name in sorted(os.listdir(log_dir)):
        folder = os.path.join(log_dir, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        logs += [read_val_log(p, default_method=name)
                 for p in sorted(glob.glob(os.path.join(folder, "*" + VAL_LOG_SUFFIX)))]
    if not logs:
        raise AccuracyTableError(f"no *{VAL_LOG_SUFFIX} files in '{log_dir}' or its method folders "
                                 "(run tools/test.py first)")
    return logs


def group_logs(logs: Sequence[ValLog]) -> Dict[Tuple[str, str], Dict[str, ValLog]]:
    """``{(method, backbone): {class: log}}``, KDAD first, then by method and backbone name."""
    groups: Dict[Tuple[str, str], Dict[str, ValLog]] = {}
    for log in logs:
        group = groups.setdefault((log.method, log.backbone), {})
        if log.class_name in group:
            raise AccuracyTableError(
                f"two val logs of {log.method} ({log.backbone}) for class '{log.class_name}': "
                f"'{group[log.class_name].path}' and '{log.path}'"
            )
        group[log.class_name] = log
    return {key: groups[key] for key in sorted(groups, key=lambda k: (k[0] != KDAD, k[0], k[1]))}


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


def _not_compared(names: Sequence[Optional[str]], backbone: str, what: str) -> str:
    listed = ", ".join(dict.fromkeys(_backbone_name(name) for name in names))
    return f"Ours is {backbone}, {what} {listed}: different backbone: not compared."


def _paper_means(
    results: Mapping[str, Mapping[str, float]], reference: MethodReference, backbone: str, tolerance: float
) -> Tuple[List[str], List[str], bool]:
    """The paper-means table and its notes, failures, and whether any mean was compared."""
    order = list(reference.order)
    present = [c for c in order if c in results]
    ours: Dict[str, Optional[float]] = {}
    complete: Dict[str, bool] = {}
    for key, _ in MEAN_COLUMNS:
        values = [v for v in (_percent(results[c], key) for c in present) if v is not None]
        ours[key], complete[key] = _mean(values), len(values) == len(order)
    rows = [(f"{m.label} ({_backbone_name(m.backbone)})", [m.values.get(key) for key, _ in MEAN_COLUMNS])
            for m in reference.means]
    rows.append(("Ours", [ours[key] for key, _ in MEAN_COLUMNS]))
    parts = [f"### Paper means (mean of the {len(order)} MVTec AD classes, %)\n\n"
             + markdown_table([label for _, label in MEAN_COLUMNS], rows, corner="Source")]
    if len(present) < len(order):
        parts.append(f"Ours: mean over the {len(present)} of {len(order)} classes with a result; a paper "
                     f"mean is compared only when all {len(order)} have one.")
    compared = [m for m in reference.means if m.compare and _matches(m.backbone, backbone)]
    if not compared:
        names = [m.backbone for m in reference.means]
        parts.append(_not_compared(names, backbone, "the paper means are for"))
    failures: List[str] = []
    checked = False
    for mean in compared:
        for key, label in MEAN_COLUMNS:
            value, published = ours[key], mean.values.get(key)
            if value is None or published is None or not complete[key]:
                continue
            checked = True
            if published - value > tolerance + 1e-9:
                failures.append(f"mean {label}: {value:.2f} is {published - value:.2f} points below the "
                                f"{mean.label} mean {published:.2f} (tolerance {tolerance:.2f})")
    return parts, failures, checked


def build_report(
    results: Mapping[str, Mapping[str, float]],
    reference: MethodReference,
    backbone: str,
    tolerance: float = 2.0,
    all_classes: bool = False,
) -> Tuple[str, List[str]]:
    """One method's markdown report for one backbone, and the comparisons that fail by more than
    ``tolerance``. References of another backbone are shown, never compared."""
    order = list(reference.order)
    display = reference.display
    sections = reference.sections
    known = [c for c in order if c in results] if sections else []
    shown = order if all_classes and sections else known
    other = [c for c in order if c in results and c not in known]
    other += sorted(c for c in results if c not in order)
    matched = [t for t in reference.per_class if _matches(t.backbone, backbone)]
    parts: List[str] = [reference.missing] if reference.missing else []
    failures: List[str] = []

    if shown:
        columns = [display.get(c, c) for c in shown] + ["Mean"]
        for key in sections:
            word, title = SECTIONS[key]
            ours = [_percent(results[c], key) if c in results else None for c in shown]
            counted = [c for c, v in zip(shown, ours) if v is not None]
            rows = []
            for table in matched or reference.per_class:
                if key in table.metrics:
                    values = table.metrics[key]
                    label = table.label if matched else f"{table.label} ({_backbone_name(table.backbone)})"
                    # Both means over the classes we have a result for, so that they are comparable.
                    mean = _mean([values.get(c) for c in counted])
                    rows.append((label, [values.get(c) for c in shown] + [mean]))
            rows.append(("Ours", ours + [_mean(ours)]))
            parts.append(f"### {title}\n\n{markdown_table(columns, rows)}")
            if 0 < len(counted) < len(order):
                parts.append(f"Mean over the {len(counted)} of {len(order)} classes with a result.")
            if not matched:
                parts.append(_not_compared([t.backbone for t in reference.per_class if key in t.metrics],
                                           backbone, "the reference rows are"))
            for table in matched:
                values = table.metrics.get(key, {})
                for c, value in zip(shown, ours):
                    published = values.get(c)
                    if value is not None and published is not None and published - value > tolerance + 1e-9:
                        failures.append(
                            f"{c} {word}: {value:.2f} is {published - value:.2f} points below {table.noun}'s "
                            f"{published:.2f} (tolerance {tolerance:.2f})"
                        )
        standard = []
        for key, label in STANDARD_ROWS:
            values = [_percent(results[c], key) if c in results else None for c in shown]
            if key not in sections and any(v is not None for v in values):
                standard.append((label, values + [_mean(values)]))
        if standard:
            parts.append(f"### Standard metrics (ours, %; {reference.standard_note})\n\n"
                         + markdown_table(columns, standard, corner="Metric"))

    checked_means = False
    if reference.means:
        means_parts, means_failures, checked_means = _paper_means(results, reference, backbone, tolerance)
        parts += means_parts
        failures += means_failures

    if other:
        rows = []
        for key, label in OTHER_ROWS:
            values = [_percent(results[c], key) for c in other]
            if any(v is not None for v in values):
                rows.append((label, values + [_mean(values)]))
        table = markdown_table(other + ["Mean"], rows, corner="Metric")
        parts.append(f"### Other classes (ours, %; no {reference.kind} reference)\n\n{table}")

    if failures:
        parts.append(f"Below {reference.noun} by more than {tolerance:.2f} points:\n"
                     + "\n".join(f"- {line}" for line in failures))
    else:
        if matched and known:
            parts.append(f"All {len(known)} classes with a {reference.kind} reference are within "
                         f"{tolerance:.2f} points of {reference.noun} (or above it).")
        if checked_means:
            parts.append(f"The means of all {len(order)} classes are within {tolerance:.2f} points of the "
                         "compared paper means (or above them).")
    return "\n\n".join(parts) + "\n", failures


def _sources(reference: MethodReference, backbone: str) -> str:
    """The sources of the reference rows a report shows (the matching per-class ones, else all)."""
    tables = [t for t in reference.per_class if _matches(t.backbone, backbone)] or reference.per_class
    lines = [f"- {t.label} ({_backbone_name(t.backbone)}): {t.source}" for t in tables]
    lines += [f"- {m.label} ({_backbone_name(m.backbone)}): {m.source}" for m in reference.means]
    return "Sources:\n" + "\n".join(lines) + "\n" if lines else ""


def build_reports(
    logs: Sequence[ValLog],
    kdad: Mapping,
    reference_dir: str = RESOURCES_DIR,
    tolerance: float = 2.0,
    all_classes: bool = False,
    method: Optional[str] = None,
) -> Tuple[str, List[str]]:
    """One report per (method, backbone) of ``logs`` (only ``method``'s when given), and all failures.
    KDAD's logs alone, with the paper's backbone, give KDAD's report without a heading."""
    if method is not None:
        found = sorted({log.method for log in logs})
        logs = [log for log in logs if log.method == method]
        if not logs:
            raise AccuracyTableError(f"no val logs of method '{method}' (found: {', '.join(found)})")
    groups = group_logs(logs)
    references: Dict[str, MethodReference] = {}
    texts: List[str] = []
    failures: List[str] = []
    for (name, backbone), classes in groups.items():
        if name not in references:
            references[name] = (kdad_reference(kdad) if name == KDAD
                                else load_method_reference(name, reference_dir, kdad))
        reference = references[name]
        text, failed = build_report({c: log.metrics for c, log in classes.items()}, reference, backbone,
                                    tolerance, all_classes)
        plain = len(groups) == 1 and name == KDAD and any(_matches(t.backbone, backbone)
                                                          for t in reference.per_class)
        if not plain:
            sources = _sources(reference, backbone)
            text = f"## {reference.name}, backbone {backbone}\n\n{text}" + (f"\n{sources}" if sources else "")
        texts.append(text)
        failures += failed
    return "\n".join(texts), failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log_dir", default="logs",
                        help="folder of <class>_val.log files (KDAD) and <method>/ folders of the others")
    parser.add_argument("--method", default=None,
                        help="only this method's logs (kdad, padim, patchcore, ...); default: all methods")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="percentage points a class may fall below its reference (exit code 1 beyond)")
    parser.add_argument("--all_classes", action="store_true",
                        help="show all 15 MVTec classes, '-' for those without a log")
    parser.add_argument("--reference", default=REFERENCE_PATH,
                        help="YAML with the KDAD paper's numbers (and the MVTec column order)")
    parser.add_argument("--reference_dir", default=RESOURCES_DIR,
                        help="folder of the other methods' <method>_reference.yaml files")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tolerance < 0:
            raise AccuracyTableError(f"--tolerance must be >= 0, got {args.tolerance}")
        report, failures = build_reports(collect(args.log_dir), load_reference(args.reference),
                                         args.reference_dir, args.tolerance, args.all_classes, args.method)
    except (AccuracyTableError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report, end="")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
