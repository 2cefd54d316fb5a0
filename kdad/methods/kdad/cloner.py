"""The cloner: a small VGG-like network trained to mimic the expert's taps."""

from __future__ import annotations

from typing import List, Sequence

import paddle
import paddle.nn as nn

from kdad.backbones.vgg import CfgItem, make_vgg_layers, run_taps
from kdad.batchnorm import use_unbiased_running_variance


class Cloner(nn.Layer):
    """VGG-like stack with BatchNorm after every conv not followed by a pool (torch's running-variance
    update, :mod:`kdad.batchnorm`), Xavier init."""

    def __init__(self, cfg: Sequence[CfgItem], use_bias: bool = False) -> None:
        super().__init__()
        self.cfg = list(cfg)
        self.features, self.taps = make_vgg_layers(self.cfg, batch_norm=True, use_bias=use_bias)
        use_unbiased_running_variance(self.features)

    def forward(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        return run_taps(self.features, self.taps, x)
