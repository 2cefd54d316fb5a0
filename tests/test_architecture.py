"""The package's house rules, checked from its source: method registry, no import cycles, a deploy
runtime that imports no training code, method defaults in the config."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

from kdad.config import METHOD_DEFAULTS, METHOD_NAMES, ConfigError, load_config
from kdad.registry import METHODS, available_methods, get_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "kdad")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _top_level_imports() -> Dict[str, Set[str]]:
    """Module -> kdad modules it imports at module level (imports inside functions are lazy and
    cannot form an import-time cycle)."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[_module_name(path)] = path
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        deps: Set[str] = set()
        for node in tree.body:
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                if name in modules and name != module:
                    deps.add(name)
        graph[module] = deps
    return graph


def _find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycles():
    graph = _top_level_imports()
    assert "kdad.engine.trainer" in graph and "kdad.deploy.runtime" in graph
    assert _find_cycle(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) == []


def test_deploy_runtime_imports_no_training_code():
    code = ("import sys, kdad.deploy.runtime, kdad.deploy.onnx_runtime; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('kdad'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    forbidden = [m for m in loaded if m.startswith(("kdad.engine", "kdad.methods", "kdad.export",
                                                     "kdad.backbones", "kdad.utils.checkpoint"))]
    assert "kdad.deploy.runtime" in loaded
    assert forbidden == []


def test_registry_and_config_agree():
    assert tuple(sorted(METHOD_NAMES)) == tuple(available_methods())
    for name in METHODS:
        spec = get_method(name)
        assert spec.name == name and callable(spec.build_model)
        # exactly one way to make a model: trained (epochs of a TrainingSpec) or fitted in one pass
        assert (spec.fit is None) != (spec.training is None)
        assert (spec.training is not None) == (name in ("kdad", "stfpm", "rd4ad", "cflow", "draem"))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_method_defaults_yield_to_explicit_values(tmp_path):
    padim_size = METHOD_DEFAULTS["padim"]["mvtec_img_size"]
    assert load_config(None, {"method": "padim"})["mvtec_img_size"] == padim_size
    assert load_config(None, {"method": "padim", "mvtec_img_size": 64})["mvtec_img_size"] == 64
    config_file = tmp_path / "c.yaml"
    config_file.write_text("method: patchcore\nmvtec_img_size: 96\n")
    loaded = load_config(str(config_file), {"layers": "layer2, layer3"})
    assert loaded["mvtec_img_size"] == 96 and loaded["layers"] == ["layer2", "layer3"]
    assert loaded.explicit == {"method", "mvtec_img_size", "layers"}
    assert load_config(None)["method"] == "kdad" and load_config(None)["mvtec_img_size"] == 128
    with pytest.raises(ConfigError, match="method must be one of"):
        load_config(None, {"method": "stfpm2"})
    with pytest.raises(ConfigError, match="'layers' must be list"):
        load_config(None, {"layers": 3})


def test_a_kdad_checkpoint_from_before_the_method_interface_loads(tmp_path):
    """Checkpoints written before ``method`` existed (no ``method`` key, no new config keys) are KDAD's."""
    import numpy as np
    import paddle

    from kdad.config import SCHEMA
    from kdad.methods.kdad.model import build_model
    from kdad.utils.checkpoint import load_model

    old_keys = set(SCHEMA) - {"method", "backbone", "backbone_pretrained", "backbone_weights", "layers",
                              "feature_dim", "coreset_ratio", "num_neighbors", "coreset_method",
                              "coreset_cell_size", "coreset_probes", "feature_engine",
                              "patchcore_bank_chunk", "overwrite", "test_fraction", "min_calibration_images"}
    config = load_config(None, {"expert": "efficientnet_lite0", "mvtec_img_size": 64})
    model = build_model(config)
    model.eval()
    path = str(tmp_path / "old_model_final.pdparams")
    paddle.save({"cloner": model.cloner.state_dict(), "epoch": 4,
                 "config": {key: value for key, value in config.items() if key in old_keys}}, path)
    loaded, state, effective = load_model(path)
    assert effective["method"] == "kdad" and "method" not in state
    x = paddle.to_tensor(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    with paddle.no_grad():
        np.testing.assert_allclose(loaded.score(x).numpy(), model.score(x).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="holds a kdad model"):
        load_model(path, load_config(None, {"method": "padim"}))
