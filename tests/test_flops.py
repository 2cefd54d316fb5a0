"""The benchmarks' FLOP counter (``benchmarks/flops.py``) against hand-worked counts."""

from __future__ import annotations

import paddle
import paddle.nn as nn

from benchmarks.flops import conv_flops, count_layers


class _Small(nn.Layer):
    """A grouped conv, a transposed conv and a linear layer on the channels, in that order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 6, 3, stride=2, padding=1, groups=3)
        self.up = nn.Conv2DTranspose(6, 2, 2, stride=2)
        self.fc = nn.Linear(2, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.up(self.conv(x))  # [N, 2, 8, 8]
        return self.fc(y.transpose([0, 2, 3, 1]))  # [N, 8, 8, 5]


def test_counts_equal_hand_worked_values() -> None:
    paddle.seed(0)
    net = _Small()
    x = paddle.rand([3, 3, 8, 8])
    records, out = count_layers(net, lambda: net(x))
    assert list(out.shape) == [3, 8, 8, 5]
    # conv: 3 images x 6 out channels x 4x4 positions x (3/3 in channels x 3x3) MACs, 2 FLOPs per MAC
    conv = 2 * 3 * 6 * 4 * 4 * 1 * 9
    # transposed conv: every input element (3 x 6 x 4x4) is spread to 2 out channels x 2x2
    up = 2 * 3 * 6 * 4 * 4 * 2 * 2 * 2
    # linear: 3 x 8 x 8 rows of 2 -> 5
    fc = 2 * 3 * 8 * 8 * 2 * 5
    assert [r["kind"] for r in records] == ["Conv2D", "Conv2DTranspose", "Linear"]
    assert [r["flops"] for r in records] == [conv, up, fc]
    assert records[0]["input_needs_grad"] is False and records[1]["input_needs_grad"] is True
    assert all(r["weight_trained"] for r in records)
    # per image and without gradients: a third of the batch's count
    per_image = conv_flops(net, net, 8)
    assert [r["flops"] * 3 for r in per_image] == [conv, up, fc]
    assert all("output" not in r for r in per_image)
