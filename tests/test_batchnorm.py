"""kdad.batchnorm: torch's BatchNorm semantics, checked against torch's documented formulas in numpy.

torch.nn.BatchNorm2d (docs): training normalises with the biased batch variance; the running
estimates move as ``running = (1 - momentum_torch) * running + momentum_torch * batch`` with the
*unbiased* batch variance; momentum_torch 0.1 = Paddle's 0.9.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn

from kdad.batchnorm import UnbiasedBatchNorm2D, use_unbiased_running_variance


def _torch_reference(batches, gamma, beta, eps=1e-5, momentum_torch=0.1):
    running_mean, running_var = np.zeros(gamma.shape), np.ones(gamma.shape)
    outputs = []
    for x in batches:
        x = x.astype(np.float64)
        mean, var_biased = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        n = x.size // x.shape[1]
        outputs.append((x - mean[:, None, None]) / np.sqrt(var_biased[:, None, None] + eps)
                       * gamma[:, None, None] + beta[:, None, None])
        running_mean = (1 - momentum_torch) * running_mean + momentum_torch * mean
        running_var = (1 - momentum_torch) * running_var + momentum_torch * var_biased * n / (n - 1)
    return outputs, running_mean, running_var


def test_running_statistics_follow_torch_formula():
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, (3, 4, 5, 5)).astype(np.float32) for _ in range(3)]
    layer = use_unbiased_running_variance(nn.BatchNorm2D(4))
    gamma = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    beta = rng.normal(0, 0.1, 4).astype(np.float32)
    layer.weight.set_value(gamma)
    layer.bias.set_value(beta)
    layer.train()
    outputs = [layer(paddle.to_tensor(x)).numpy() for x in batches]
    want_outputs, want_mean, want_var = _torch_reference(batches, gamma.astype(np.float64),
                                                         beta.astype(np.float64))
    for got, want in zip(outputs, want_outputs):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer._mean.numpy(), want_mean, rtol=1e-5)
    np.testing.assert_allclose(layer._variance.numpy(), want_var, rtol=1e-5)
    # Paddle's own layer takes the biased variance: 75 values per channel -> 1/74 apart in the update
    plain = nn.BatchNorm2D(4)
    plain.train()
    for x in batches:
        plain(paddle.to_tensor(x))
    assert np.abs(plain._variance.numpy() - want_var).max() > 1e-3
    # eval mode normalises with the running statistics
    layer.eval()
    x = batches[0]
    expected = ((x - want_mean[:, None, None]) / np.sqrt(want_var[:, None, None] + 1e-5)
                * gamma[:, None, None] + beta[:, None, None])
    np.testing.assert_allclose(layer(paddle.to_tensor(x)).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_gradients_and_keys_equal_paddles_layer():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    weights = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    grads = []
    for convert in (False, True):
        layer = nn.BatchNorm2D(3)
        if convert:
            use_unbiased_running_variance(layer)
        layer.train()
        inp = paddle.to_tensor(x, stop_gradient=False)
        (layer(inp) * paddle.to_tensor(weights)).sum().backward()
        grads.append((inp.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy(),
                      sorted(layer.state_dict())))
    for plain, ours in zip(*grads):
        if isinstance(plain, list):
            assert plain == ours
        else:
            np.testing.assert_allclose(ours, plain, rtol=1e-6, atol=1e-6)


def test_conversion_reaches_nested_layers_only_for_batchnorm():
    net = nn.Sequential(nn.Conv2D(3, 4, 3), nn.BatchNorm2D(4), nn.Sequential(nn.BatchNorm2D(4), nn.ReLU()))
    use_unbiased_running_variance(net)
    kinds = [type(layer) for layer in net.sublayers()]
    assert kinds.count(UnbiasedBatchNorm2D) == 2 and nn.Conv2D in kinds and nn.ReLU in kinds
