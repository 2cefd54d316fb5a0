"""A faster cloner training step, with the same results as the trainer's dynamic-graph step.

The trainer (:mod:`kdad.engine.trainer`) runs, per batch::

    loss = training_loss(cloner(x), expert_feats, loss_taps, lamda, direction_only)
    loss.backward(); optimizer.step(); optimizer.clear_grad()

:class:`FastTrainStep` does the same arithmetic with two optional speed-ups:

* ``static=True``: the cloner forward and the loss are one static program
  (``paddle.jit.to_static(full_graph=True)``); ``loss.backward()`` then runs the program's backward
  in the executor, without the dynamic graph's per-op dispatch. BatchNorm running statistics are
  updated by the program exactly as in the dynamic graph. The optimizer is the caller's (Adam).
* ``expert_engine="paddle_inference"`` (uncached training only): the frozen expert's loss taps come
  from a Paddle Inference predictor with oneDNN (forward only) instead of the dynamic graph. Its
  features differ from the dynamic graph's by float rounding (~1e-6 relative).

Not done here, and why: oneDNN kernels for the *training* graph are not available in Paddle 3.3.1
(``FLAGS_use_mkldnn`` does not change dynamic-graph kernels, and a to_static program run with it set
crashes in ``run_program``); NHWC gains nothing with the native CPU conv kernels.

A large, free speed-up of every native CPU kernel (dynamic graph and static programs alike) on AMD
CPUs is the environment variable ``MKL_DEBUG_CPU_TYPE=5``, set before ``import paddle`` (see
``docs/benchmarks.md``).

``tests/test_fast_train.py`` checks losses, weights and BatchNorm statistics against the plain step.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from kdad.methods.kdad.loss import training_loss
from kdad.methods.kdad.model import KDADModel


def plain_step(model: KDADModel, cloner: nn.Layer, optimizer, x: paddle.Tensor,
               expert_feats: Optional[Mapping[int, paddle.Tensor]]) -> float:
    """The trainer's step, verbatim (the reference for the fast one)."""
    if expert_feats is None:
        expert_feats = model.expert_loss_features(x)
    loss = training_loss(cloner(x), expert_feats, model.loss_taps, model.lamda, model.direction_only)
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    return float(loss)


class _LossProgram(nn.Layer):
    """``(x, expert tap features...) -> training loss``; converted to one static program."""

    def __init__(self, cloner: nn.Layer, loss_taps: Sequence[int], lamda: float, direction_only: bool) -> None:
        super().__init__()
        self.cloner = cloner
        self.loss_taps = tuple(loss_taps)
        self.lamda = float(lamda)
        self.direction_only = bool(direction_only)

    def forward(self, x, f0, f1, f2, f3):  # fixed arity: the paper's 4 loss taps
        feats = dict(zip(self.loss_taps, (f0, f1, f2, f3)))
        return training_loss(self.cloner(x), feats, self.loss_taps, self.lamda, self.direction_only)


class _ExpertTapsGraph(nn.Layer):
    def __init__(self, expert: nn.Layer, loss_taps: Sequence[int]) -> None:
        super().__init__()
        self.expert = expert
        self.loss_taps = tuple(loss_taps)

    def forward(self, x):
        feats = self.expert(x)
        return [feats[tap] for tap in self.loss_taps]


class InferenceExpert:
    """The expert's loss taps from a Paddle Inference predictor (oneDNN on, forward only)."""

    def __init__(self, model: KDADModel, image_size: int, threads: int = 2, enable_mkldnn: bool = True,
                 folder: Optional[str] = None) -> None:
        from paddle import inference

        self._tmp = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kdad_expert_")
            folder = self._tmp.name
        graph = _ExpertTapsGraph(model.expert, model.loss_taps)
        graph.eval()
        spec = [paddle.static.InputSpec([None, 3, image_size, image_size], "float32", name="x")]
        paddle.jit.save(paddle.jit.to_static(graph, input_spec=spec, full_graph=True),
                        os.path.join(folder, "model"))
        config = inference.Config(os.path.join(folder, "model.json"), os.path.join(folder, "model.pdiparams"))
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(int(threads))
        if enable_mkldnn:
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(10)
        else:
            config.disable_mkldnn()
        config.switch_ir_optim(True)
        config.switch_use_feed_fetch_ops(False)
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)
        self.loss_taps = tuple(model.loss_taps)

    def numpy_features(self, images: np.ndarray) -> Dict[int, np.ndarray]:
        handle = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        handle.reshape(list(images.shape))
        handle.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        names = self.predictor.get_output_names()
        return {tap: self.predictor.get_output_handle(name).copy_to_cpu()
                for tap, name in zip(self.loss_taps, names)}

    def __call__(self, x: paddle.Tensor) -> Dict[int, paddle.Tensor]:
        return {tap: paddle.to_tensor(v) for tap, v in self.numpy_features(x.numpy()).items()}


class FastTrainStep:
    """``step(x, expert_feats or None) -> loss`` with the trainer's arithmetic, faster.

    ``cloner`` is what the trainer calls (``model.cloner`` or its ``DataParallel`` wrapper; with
    ``static=True`` it must be the plain cloner).
    """

    def __init__(self, model: KDADModel, optimizer, static: bool = True, expert_engine: str = "dygraph",
                 image_size: Optional[int] = None, threads: int = 2, cloner: Optional[nn.Layer] = None) -> None:
        if expert_engine not in ("dygraph", "paddle_inference"):
            raise ValueError("expert_engine must be 'dygraph' or 'paddle_inference'")
        self.model = model
        self.optimizer = optimizer
        self.cloner = cloner if cloner is not None else model.cloner
        self.static = bool(static)
        if self.static:
            if isinstance(self.cloner, paddle.DataParallel):
                raise ValueError("static=True does not support DataParallel; use static=False")
            if len(model.loss_taps) != 4:
                raise ValueError("static=True expects the 4 loss taps of the paper")
            self.program = paddle.jit.to_static(
                _LossProgram(self.cloner, model.loss_taps, model.lamda, model.direction_only), full_graph=True)
        self.expert = None
        if expert_engine == "paddle_inference":
            if image_size is None:
                raise ValueError("expert_engine='paddle_inference' needs image_size")
            self.expert = InferenceExpert(model, int(image_size), threads)

    def expert_features(self, x: paddle.Tensor) -> Dict[int, paddle.Tensor]:
        if self.expert is not None:
            return self.expert(x)
        return self.model.expert_loss_features(x)

    def loss(self, x: paddle.Tensor, expert_feats: Mapping[int, paddle.Tensor]) -> paddle.Tensor:
        if self.static:
            return self.program(x, *[expert_feats[tap] for tap in self.model.loss_taps])
        return training_loss(self.cloner(x), expert_feats, self.model.loss_taps, self.model.lamda,
                             self.model.direction_only)

    def __call__(self, x: paddle.Tensor, expert_feats: Optional[Mapping[int, paddle.Tensor]] = None) -> float:
        if expert_feats is None:
            expert_feats = self.expert_features(x)
        loss = self.loss(x, expert_feats)
        loss.backward()
        self.optimizer.step()
        self.optimizer.clear_grad()
        return float(loss)


def cloner_state(model: KDADModel) -> Dict[str, np.ndarray]:
    """Weights and BatchNorm statistics of the cloner as numpy arrays (for comparisons)."""
    return {key: value.numpy().copy() for key, value in model.cloner.state_dict().items()}


def compare_states(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference over all entries (inf when the keys differ)."""
    if set(a) != set(b):
        return float("inf")
    return max((float(np.abs(a[k] - b[k]).max()) for k in a), default=0.0)


__all__: List[str] = ["FastTrainStep", "InferenceExpert", "plain_step", "cloner_state", "compare_states"]
