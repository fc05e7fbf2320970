"""The im2col path of FastNet's 3x3 convolutions (cifarlens.models.small_conv): the same
outputs and gradients as nn.Conv2d, taken only where it was measured to pay."""

import pytest
import torch
import torch.nn.functional as F

from cifarlens.models import create_model
from cifarlens.models import small_conv
from cifarlens.models.small_conv import SmallMapConv2d, im2col_dtypes


@pytest.fixture
def forced(monkeypatch):
    """The path on for both precisions, whatever this CPU, and a count of the convolutions that took it."""
    monkeypatch.setattr(small_conv, "im2col_dtypes", lambda: frozenset(small_conv.PLANS))
    calls = []
    apply = small_conv._Im2colConv3x3.apply

    def counting(x, weight, whole):
        calls.append((tuple(x.shape), whole))
        return apply(x, weight, whole)

    monkeypatch.setattr(small_conv._Im2colConv3x3, "apply", counting)
    return calls


def _pair(batch, in_ch, out_ch, side):
    """A SmallMapConv2d, an nn.Conv2d sharing its weight, an input and an output gradient."""
    torch.manual_seed(side)
    conv = SmallMapConv2d(in_ch, out_ch)
    plain = torch.nn.Conv2d(in_ch, out_ch, 3, padding="same", bias=False)
    plain.weight = conv.weight
    x = torch.randn(batch, in_ch, side, side).contiguous(memory_format=torch.channels_last)
    return conv, plain, x, torch.randn(batch, out_ch, side, side)


def _run(conv, x, grad, dtype=torch.bfloat16):
    """Output, input gradient and weight gradient, under autocast to ``dtype`` (fp32: none)."""
    x = x.clone().requires_grad_(True)
    conv.zero_grad()
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        out = conv(x)
    out.backward(grad)
    return out.float(), x.grad.float(), conv.weight.grad.clone()


@pytest.mark.parametrize("side", [1, 2, 3, 5, 7])
def test_outputs_and_gradients_are_those_of_a_plain_convolution(forced, side):
    conv, plain, x, grad = _pair(5, 24, 32, side)
    mine, ref = _run(conv, x, grad), _run(plain, x, grad)
    assert forced == [((5, 24, side, side), side <= small_conv.PLANS[torch.bfloat16].whole_side)]  # it did take the path
    for a, b in zip(mine, ref):  # bf16 products either way; only the order of the sums differs
        assert a.shape == b.shape
        assert (a - b).norm() <= 1e-2 * b.norm()
    # and against fp32 arithmetic, within what bf16 allows
    with torch.no_grad():
        exact = F.conv2d(x, conv.weight, padding=1)
    assert (mine[0] - exact).norm() <= 2e-2 * exact.norm()


def test_the_path_is_only_taken_in_bf16_training_on_small_maps(forced):
    conv = SmallMapConv2d(8, 8)
    small = torch.randn(2, 8, 3, 3)
    conv(small)  # fp32, no autocast: fp32's plan wants 128 filters or more
    with torch.autocast("cpu", torch.float16):
        conv(small)  # another autocast dtype: no plan
    with torch.autocast("cpu", torch.bfloat16):
        conv(torch.randn(2, 8, 8, 8))  # larger than bf16's weight_side
        with torch.no_grad():
            conv(small)
        conv.eval()
        conv(small)
    assert forced == []
    conv.train()
    with torch.autocast("cpu", torch.bfloat16):
        conv(small)
    assert forced == [((2, 8, 3, 3), True)]


def test_fastnet_trains_the_same_with_and_without_the_path(forced, monkeypatch):
    torch.manual_seed(0)
    model = create_model("fastnet", 10, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():  # its Dirac init makes the wider convolutions identities: spread the filters
        for conv in (m for m in model.modules() if isinstance(m, SmallMapConv2d)):
            conv.weight.add_(torch.randn_like(conv.weight) * conv.weight.std())
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))

    def grads():
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_on, on = grads()
    assert sorted(whole for _, whole in forced) == [False, False, True]  # 7x7, 7x7 and 3x3 maps at 32 px
    monkeypatch.setattr(small_conv, "im2col_dtypes", frozenset)
    loss_off, off = grads()
    assert len(forced) == 3  # no more calls
    assert torch.allclose(loss_on, loss_off, rtol=1e-3)
    assert on.keys() == off.keys()
    for name in on:  # bf16 rounding in another order moves them up to ~1 % (a wrong col2im: 20-40 %)
        assert (on[name] - off[name]).norm() <= 5e-2 * off[name].norm() + 1e-12, name


def test_the_environment_decides_first(monkeypatch):
    im2col_dtypes.cache_clear()
    try:
        monkeypatch.setenv("CIFARLENS_IM2COL", "0")
        assert im2col_dtypes() == frozenset()
        im2col_dtypes.cache_clear()
        monkeypatch.setenv("CIFARLENS_IM2COL", "1")
        assert im2col_dtypes() == {torch.bfloat16, torch.float32}
        im2col_dtypes.cache_clear()
        monkeypatch.delenv("CIFARLENS_IM2COL")
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # oneDNN held below AMX
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert im2col_dtypes() == frozenset()
        im2col_dtypes.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # an AVX2-only CPU
        assert im2col_dtypes() == {torch.float32}
    finally:
        im2col_dtypes.cache_clear()


@pytest.mark.parametrize("side", [2, 7])
def test_fp32_weight_gradient_as_a_product_is_the_plain_ones(forced, side):
    """fp32 (an AVX2 CPU's precision): only the weight gradient takes the path, on maps up to 7x7
    with 128 filters or more; outputs and gradients equal nn.Conv2d's to fp32 rounding."""
    conv, plain, x, grad = _pair(3, 16, 128, side)
    results = [_run(module, x, grad, torch.float32) for module in (conv, plain)]
    assert forced == [((3, 16, side, side), False)]  # the weight gradient alone, in fp32
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_fp32_plan_leaves_larger_maps_and_narrow_layers_to_onednn(forced):
    SmallMapConv2d(16, 128)(torch.randn(2, 16, 8, 8))  # past 7x7
    SmallMapConv2d(16, 64)(torch.randn(2, 16, 7, 7))  # fewer than 128 filters
    assert forced == []
