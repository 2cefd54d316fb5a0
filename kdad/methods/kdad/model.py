"""The exportable KDAD model: expert + cloner + the distance of :mod:`kdad.methods.kdad.loss`.

Kept apart from the training loop (as Anomalib keeps ``torch_model.py`` apart from its Lightning
module): ``forward`` returns per-image anomaly scores; :class:`kdad.methods.kdad.localization` and
:mod:`kdad.export` reuse :meth:`KDADModel.score` for maps and static graphs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import paddle
import paddle.nn as nn

from kdad.backbones.vgg import tap_geometry
from kdad.methods.kdad.cloner import Cloner
from kdad.methods.kdad.experts import Expert, build_expert
from kdad.methods.kdad.loss import per_image_distance, training_loss


class KDADModel(nn.Layer):
    """Frozen expert and trainable cloner; ``forward(x)`` gives scores of shape ``[N]``."""

    def __init__(
        self,
        expert: Expert,
        cloner: Cloner,
        lamda: float,
        direction_only: bool = False,
        loss_taps: Optional[Sequence[int]] = None,
        score_taps: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        self.expert = expert
        self.cloner = cloner
        self.lamda = float(lamda)
        self.direction_only = bool(direction_only)
        self.loss_taps = tuple(loss_taps if loss_taps is not None else expert.spec.loss_taps)
        self.score_taps = tuple(score_taps if score_taps is not None else expert.spec.score_taps)

    def train(self) -> KDADModel:  # the expert never leaves eval mode
        super().train()
        self.expert.eval()
        return self

    def features(self, x: paddle.Tensor):
        """``(cloner_taps, expert_taps)`` for images ``x`` in [0, 1]."""
        return self.cloner(x), self.expert(x)

    def score(self, x: paddle.Tensor) -> paddle.Tensor:
        """Per-image anomaly score (the distance over the score taps)."""
        cloner_feats, expert_feats = self.features(x)
        return per_image_distance(cloner_feats, expert_feats, self.score_taps, self.lamda,
                                  self.direction_only)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.score(x)

    def loss(self, x: paddle.Tensor, expert_feats: Optional[Mapping[int, paddle.Tensor]] = None):
        """Training loss over the loss taps; ``expert_feats`` (tap -> tensor) may be cached."""
        cloner_feats = self.cloner(x)
        if expert_feats is None:
            with paddle.no_grad():
                expert_feats = self.expert(x)
        return training_loss(cloner_feats, expert_feats, self.loss_taps, self.lamda, self.direction_only)

    @paddle.no_grad()
    def expert_loss_features(self, x: paddle.Tensor) -> Dict[int, paddle.Tensor]:
        """The expert's loss-tap activations (what the trainer caches)."""
        feats = self.expert(x)
        return {tap: feats[tap] for tap in self.loss_taps}


def check_taps_match(expert: Expert, cloner: Cloner, image_size: int) -> None:
    """Raise when the cloner's loss/score taps do not have the expert's shapes."""
    geometry = tap_geometry(cloner.cfg)
    with paddle.no_grad():
        probe = paddle.zeros([1, 3, image_size, image_size])
        expert_feats = expert(probe)
    for tap in sorted(set(expert.spec.loss_taps) | set(expert.spec.score_taps)):
        channels, stride = geometry[tap]
        expected = [1, channels, image_size // stride, image_size // stride]
        got = list(expert_feats[tap].shape)
        if got != expected:
            raise ValueError(
                f"expert '{expert.spec.name}' tap {tap} has shape {got} but the cloner gives {expected} "
                f"at image size {image_size}"
            )


def build_model(config: Mapping[str, Any]) -> KDADModel:
    """Build the model described by a validated config (see :mod:`kdad.config`)."""
    expert = build_expert(
        config["expert"], pretrain=bool(config["pretrain"]), weights_path=config.get("expert_weights"),
        equal_network_size=bool(config["equal_network_size"]),
    )
    cloner = Cloner(expert.spec.cloner_cfg, use_bias=bool(config["use_bias"]))
    return KDADModel(expert, cloner, lamda=float(config["lamda"]),
                     direction_only=bool(config["direction_loss_only"]))


def cloner_parameters(model: KDADModel) -> List[paddle.Tensor]:
    return [p for p in model.cloner.parameters() if not p.stop_gradient]
