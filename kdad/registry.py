"""Method names -> where they live. Adding a method: a folder under ``kdad/methods/``, one line here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Dict, List

if TYPE_CHECKING:  # the registry itself imports no paddle code
    from kdad.methods.base import MethodSpec

# method name -> module exposing ``METHOD: MethodSpec`` (imported on first use)
METHODS: Dict[str, str] = {
    "kdad": "kdad.methods.kdad",
    "padim": "kdad.methods.padim",
    "patchcore": "kdad.methods.patchcore",
    "stfpm": "kdad.methods.stfpm",
    "rd4ad": "kdad.methods.rd4ad",
    "cflow": "kdad.methods.cflow",
    "draem": "kdad.methods.draem",
}


def available_methods() -> List[str]:
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name`` (a clear error for an unknown name)."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {available_methods()}")
    spec = importlib.import_module(METHODS[name]).METHOD
    if spec.name != name:
        raise RuntimeError(f"{METHODS[name]} registers method '{spec.name}', expected '{name}'")
    return spec
