"""The method interface: what every anomaly-detection method in kdad provides.

A method lives in ``kdad/methods/<name>/`` and registers one :class:`MethodSpec` in
:mod:`kdad.registry`. Its exportable network is an :class:`AnomalyModel`: RGB images in [0, 1]
(``[N, 3, S, S]``) in, ``(scores [N], anomaly maps [N, S, S])`` out, with everything scoring needs
(memory bank, Gaussian statistics, flows) inside it as buffers, so ``paddle.jit.save`` of the model
is the deployable scorer. Training or fitting code is kept apart (``fit.py`` / ``train.py``), and the
shared engine (:mod:`kdad.engine`) does data, calibration, checkpoints, evaluation and export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn


class AnomalyModel(nn.Layer):
    """Base class of a method's exportable network.

    Subclasses set :attr:`method` and :attr:`backbone_name`, keep their backbone in
    ``self.backbone`` (so checkpoints can leave pretrained weights out) and implement ``forward``.
    State that fitting creates with a data-dependent shape (a memory bank) is restored by
    :meth:`load_fitted_state`, which resizes buffers before loading.
    """

    method: str = ""
    backbone_name: str = ""

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:  # pragma: no cover
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return bool(getattr(self, "_fitted", False))

    def mark_fitted(self) -> None:
        self._fitted = True

    def checkpoint_state(self, include_backbone: bool) -> Dict[str, np.ndarray]:
        """The state dict as numpy arrays, without ``backbone.*`` unless ``include_backbone``."""
        return {key: value.numpy() for key, value in self.state_dict().items()
                if include_backbone or not key.startswith("backbone.")}

    def load_fitted_state(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Load :meth:`checkpoint_state` output; a missing or misshapen entry is an error naming
        ``source``. Buffers whose shape depends on the data are resized first (:meth:`resize_buffers`)."""
        self.resize_buffers(state)
        own = self.state_dict()
        needed = [key for key in own if key in state or not key.startswith("backbone.")]
        missing = [key for key in needed if key not in state]
        if missing:
            raise ValueError(f"'{source}' lacks {len(missing)} entries of the {self.method} model, "
                             f"e.g. {missing[:3]}")
        loaded = {}
        for key in needed:
            array = np.asarray(state[key])
            if list(array.shape) != list(own[key].shape):
                raise ValueError(f"'{source}': {key} has shape {list(array.shape)}, the {self.method} "
                                 f"model built from its config expects {list(own[key].shape)}")
            loaded[key] = array
        for key, array in loaded.items():  # set one by one: set_state_dict warns about absent backbone keys
            own[key].set_value(array.astype(own[key].numpy().dtype, copy=False))
        self.mark_fitted()

    def resize_buffers(self, state: Mapping[str, Any]) -> None:
        """Hook: give data-dependent buffers the shapes of ``state`` before loading (default: none)."""
        del state


def new_buffer(layer: nn.Layer, name: str, shape: Sequence[int], dtype: str = "float32") -> None:
    """Register (or replace) a persistable zero buffer ``name`` of ``shape`` on ``layer``."""
    layer.register_buffer(name, paddle.zeros(list(shape), dtype=dtype), persistable=True)


def backbone_taps(model: AnomalyModel, x: paddle.Tensor) -> Dict[str, paddle.Tensor]:
    """``{tap: [N, C, h, w]}``: the frozen backbone's outputs at ``model.layers`` for [0, 1] RGB ``x``,
    without gradients (the ``teacher_features`` of STFPM, RD4AD and CFlow-AD)."""
    with paddle.no_grad():
        feats = model.backbone(x)
    return {tap: feats[tap].detach() for tap in model.layers}


@dataclass(frozen=True)
class TrainingSpec:
    """How the shared epoch trainer (:mod:`kdad.engine.trainer`) trains a method's student.

    ``student(model)``: the layer whose parameters are optimised (its state, with the rest of the
    model's non-backbone state, is what checkpoints keep). ``teacher_features(model, x)``: the frozen
    teacher's outputs that the loss needs, ``{name: [N, ...]}``, computed without gradients (``{}``
    for a method without a teacher); unless ``cacheable`` is False the trainer computes them once per
    image and caches them. ``loss(model, student, x, teacher_features, rng)``: the scalar training
    loss of a batch; ``student`` is ``student(model)`` or its data-parallel wrapper, so the loss calls
    ``student(...)`` for the forward; ``rng`` is a ``numpy.random.Generator`` seeded by (seed, epoch,
    batch), the only randomness a loss may use (anomaly simulation, fiber sampling), so a resumed run
    draws what the uninterrupted one drew. ``optimizer(config, parameters)``: the method's optimiser
    (the paper's recipe); when its learning rate is a ``paddle.optimizer.lr.LRScheduler`` the trainer
    steps it once per epoch (its state is checkpointed with the optimiser's). ``prepare(model,
    config)``: once before the first epoch (e.g. loading anomaly sources). ``resume_keys``: further
    config keys a resumed run must share with its checkpoint. ``step`` and ``finalize``: see below.
    """

    student: Callable[[AnomalyModel], nn.Layer]
    teacher_features: Callable[[AnomalyModel, paddle.Tensor], Dict[str, paddle.Tensor]]
    optimizer: Callable[[Mapping[str, Any], Sequence[paddle.Tensor]], paddle.optimizer.Optimizer]
    loss: Optional[Callable[..., paddle.Tensor]] = None
    #: instead of ``loss``, for a method that takes several optimiser steps per image batch (CFlow-AD's
    #: fiber batches): ``step(model, student, x, teacher_features, rng, optimizer) -> float`` optimises
    #: on the batch and returns the loss value to log (the trainer stops when it is not finite)
    step: Optional[Callable[..., float]] = None
    resume_keys: Tuple[str, ...] = ()
    #: False when the teacher's input is randomly augmented per batch (its features cannot be cached)
    cacheable: bool = True
    prepare: Optional[Callable[[AnomalyModel, Mapping[str, Any]], None]] = None
    #: after the last epoch, before calibration and the final checkpoint: ``finalize(model, train_images,
    #: config)`` (CFlow-AD's reference maxima from the training images)
    finalize: Optional[Callable[[AnomalyModel, Any, Mapping[str, Any]], None]] = None
    #: False when the method's ``step`` averages its gradients over the ranks itself
    #: (:mod:`kdad.utils.distributed`) instead of the trainer wrapping the student in ``paddle.DataParallel``
    data_parallel: bool = True

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.step is None):
            raise ValueError("a TrainingSpec gives exactly one of loss and step")


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    ``build_model(config)`` returns the untrained/unfitted :class:`AnomalyModel` (pretrained
    backbone loaded). ``fit(model, images, config, log)`` fits a training-free method on normal
    images ``[N, 3, S, S]`` in [0, 1] and returns a dict of facts for the log and checkpoint;
    ``log`` is a callable taking one message (the engine passes its logger's ``info``).
    A trained method gives ``training`` (:class:`TrainingSpec`) instead of ``fit``.
    """

    name: str
    summary: str
    build_model: Callable[[Mapping[str, Any]], AnomalyModel]
    fit: Optional[Callable[..., Dict[str, Any]]] = None
    training: Optional[TrainingSpec] = None
    #: in-graph blur already applied to the exported maps (the runtime must not blur again)
    maps_blurred_in_graph: bool = True
    #: False for a method without an ImageNet backbone (DRAEM): its runs name the backbone "none"
    uses_backbone: bool = True
