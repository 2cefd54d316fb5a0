"""BatchNorm whose running variance follows torch's update, for every trained network in kdad.

Paddle's BatchNorm (3.3.1) moves its running variance towards the *biased* batch variance
(``sum((x - mean)^2) / n``); torch, which the reference code of every method runs on, uses the
*unbiased* one (``/ (n - 1)``, ``n = N * H * W``). The normalisation of the batch itself uses the
biased variance in both. With ``n`` small (8 images at 8x8 in KDAD's deepest layers) eval-mode
statistics differ by ``1 / (n - 1)`` after training. :class:`UnbiasedBatchNorm2D` is Paddle's layer
(same parameters, buffers and names, so checkpoints load either way) with torch's running update::

    running_var = momentum * running_var + (1 - momentum) * var_unbiased(batch)

(Paddle's ``momentum`` 0.9 is torch's 0.1), computed from the op's own biased update (``C`` values,
no extra pass over the activations). :func:`use_unbiased_running_variance` converts the
BatchNorm layers of a network in place; the students of KDAD, STFPM and RD4AD call it.
"""

from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


class UnbiasedBatchNorm2D(nn.BatchNorm2D):
    """``nn.BatchNorm2D`` with torch's unbiased running-variance update in training mode."""

    def forward(self, input: paddle.Tensor) -> paddle.Tensor:  # noqa: A002 - Paddle's argument name
        if not self.training or self._use_global_stats:
            return super().forward(input)
        self._check_data_format(self._data_format)
        self._check_input_dim(input)
        with paddle.no_grad():
            previous = self._variance.clone()
            scratch = previous.clone()
        # Paddle's op moves the variance it is given to ``m * previous + (1 - m) * biased``: give it a
        # scratch copy (the backward keeps a reference to it, so the real buffer is set afresh below)
        output = F.batch_norm(input, self._mean, scratch, weight=self.weight, bias=self.bias,
                              training=True, momentum=self._momentum, epsilon=self._epsilon,
                              data_format=self._data_format, use_global_stats=self._use_global_stats)
        with paddle.no_grad():
            # the op's biased batch variance scaled by n / (n - 1): C values, no second pass over the input
            channels = input.shape[1 if self._data_format == "NCHW" else 3]
            count = (paddle.numel(input) // channels).astype(previous.dtype)
            momentum = float(self._momentum)
            moved = scratch - momentum * previous  # (1 - m) * biased batch variance
            paddle.assign(momentum * previous + moved * (count / (count - 1.0)), output=self._variance)
        return output


def use_unbiased_running_variance(layer: nn.Layer) -> nn.Layer:
    """Make every ``nn.BatchNorm2D`` in ``layer`` (itself included) an :class:`UnbiasedBatchNorm2D`,
    in place (parameters and buffers are kept); returns ``layer``."""
    for sublayer in [layer, *layer.sublayers()]:
        if type(sublayer) is nn.BatchNorm2D:
            sublayer.__class__ = UnbiasedBatchNorm2D
    return layer
