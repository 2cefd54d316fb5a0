"""The hand-written backward (kdad.methods.kdad.explicit_gradient) against Paddle's autograd.

``paddle.grad`` in the dynamic graph is the independent reference: every layer's data gradient,
the max-pool tie rule, guided backprop and the whole input-gradient map of both experts.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from kdad.config import load_config
from kdad.methods.kdad.explicit_gradient import (
    ExplicitGradientGraph,
    conv_data_grad,
    maxpool2x2_grad,
    maxpool2x2_grad_unpool,
)
from kdad.methods.kdad.localization import channel_abs_sum, guided_relus, input_gradients
from kdad.methods.kdad.model import build_model


def _autograd_input_grad(layer, x: np.ndarray, upstream: np.ndarray) -> np.ndarray:
    xt = paddle.to_tensor(x)
    xt.stop_gradient = False
    out = layer(xt)
    (grad,) = paddle.grad(paddle.sum(out * paddle.to_tensor(upstream)), xt)
    return grad.numpy()


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, "SAME", 1), (2, "SAME", 4), (1, 0, 2)])
def test_conv_data_grad_matches_autograd(size: int, stride: int, padding, groups: int) -> None:
    paddle.seed(0)
    conv = nn.Conv2D(4, 8, 3, stride=stride, padding=padding, groups=groups, bias_attr=False)
    rng = np.random.default_rng(size)
    x = rng.standard_normal((2, 4, size, size)).astype(np.float32)
    out_shape = conv(paddle.to_tensor(x)).shape
    upstream = rng.standard_normal(out_shape).astype(np.float32)
    want = _autograd_input_grad(conv, x, upstream)
    got = conv_data_grad(paddle.to_tensor(upstream), conv, x.shape[2:]).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pool_grad", [maxpool2x2_grad, maxpool2x2_grad_unpool])
def test_maxpool_gradient_takes_first_maximum_like_paddle(pool_grad) -> None:
    # small integers: many windows hold two, three or four equal maxima
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(2, 3, 8, 8)).astype(np.float32)
    upstream = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    pool = nn.MaxPool2D(2, 2)
    want = _autograd_input_grad(pool, x, upstream)
    xt = paddle.to_tensor(x)
    if pool_grad is maxpool2x2_grad:
        got = pool_grad(paddle.to_tensor(upstream), xt, pool(xt))
    else:
        got = pool_grad(paddle.to_tensor(upstream), xt)
    np.testing.assert_array_equal(got.numpy(), want)
    # one gradient per window, at the first maximum in row-major order (worked by hand)
    window = np.array([[[[2.0, 2.0], [2.0, 1.0]]]], dtype=np.float32)
    got = maxpool2x2_grad(paddle.to_tensor(np.ones((1, 1, 1, 1), np.float32)), paddle.to_tensor(window),
                          pool(paddle.to_tensor(window)))
    np.testing.assert_array_equal(got.numpy(), [[[[1.0, 0.0], [0.0, 0.0]]]])


def _randomise_batchnorm(model) -> None:
    """Non-trivial running statistics and affine parameters, so the BatchNorm scale matters."""
    rng = np.random.default_rng(5)
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            c = layer._variance.shape[0]
            layer._mean.set_value(rng.normal(0, 0.1, c).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 2.0, c).astype(np.float32))
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.bias.set_value(rng.normal(0, 0.1, c).astype(np.float32))


def _model(expert: str, size: int, **extra):
    paddle.seed(1)
    config = load_config(None, {"expert": expert, "pretrain": expert != "vgg16", "mvtec_img_size": size,
                                **extra})
    model = build_model(config)
    _randomise_batchnorm(model.cloner)
    model.eval()
    return model


def _check(model, guided: bool = False, size: int = 32) -> None:
    x = np.random.default_rng(2).random((3, 3, size, size), dtype=np.float32)
    if guided:
        with guided_relus(model.cloner):
            want_scores, grads = input_gradients(model, paddle.to_tensor(x))
    else:
        want_scores, grads = input_gradients(model, paddle.to_tensor(x))
    want = channel_abs_sum(grads)
    graph = ExplicitGradientGraph(model, guided=guided)
    with paddle.no_grad():
        scores, maps = graph(paddle.to_tensor(x))
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5)
    np.testing.assert_allclose(maps.numpy(), want, rtol=0, atol=1e-4 * float(want.max()))


@pytest.mark.parametrize("extra", [{}, {"direction_loss_only": True},
                                   {"lamda": 0.01, "equal_network_size": True}])
def test_vgg_gradient_map_matches_autograd(extra) -> None:
    _check(_model("vgg16", 32, **extra))


def test_vgg_guided_backprop_matches_autograd() -> None:
    _check(_model("vgg16", 32), guided=True)


def test_efficientnet_gradient_map_matches_autograd() -> None:
    # pretrained weights: ReLU6 saturation, SAME padding, strided depthwise convs and skips all occur
    _check(_model("efficientnet_lite0", 64), size=64)


def test_unsupported_layer_is_refused() -> None:
    model = _model("vgg16", 32)
    model.cloner.features[2] = nn.Sigmoid()
    with pytest.raises(TypeError, match="Sigmoid"):
        with paddle.no_grad():
            ExplicitGradientGraph(model)(paddle.to_tensor(np.zeros((1, 3, 32, 32), np.float32)))


def test_relu_gradient_is_zero_at_zero_output() -> None:
    x = np.array([[[[-1.0, 0.0], [0.5, 2.0]]]], dtype=np.float32)
    upstream = np.ones_like(x)
    want = _autograd_input_grad(nn.ReLU(), x, upstream)
    from kdad.methods.kdad.explicit_gradient import relu_grad

    got = relu_grad(paddle.to_tensor(upstream), F.relu(paddle.to_tensor(x))).numpy()
    np.testing.assert_array_equal(got, want)
