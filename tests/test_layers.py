"""Matrix-product bilinear resizing equals F.interpolate(align_corners=True)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from curriculum.layers import interp_matrix, resize_bilinear


@given(n_in=st.integers(1, 40), n_out=st.integers(1, 80))
@settings(max_examples=60, deadline=None)
def test_interp_matrix_is_f_interpolate_of_the_identity(n_in, n_out):
    m = interp_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in)
    torch.testing.assert_close(m.sum(1), torch.ones(n_out), rtol=0, atol=1e-6)
    eye = torch.eye(n_in)[None]  # (1, n_in, n_in): each column an impulse
    want = F.interpolate(eye, size=n_out, mode="linear", align_corners=True)[0]  # (n_in, n_out)
    torch.testing.assert_close(m, want.t(), rtol=0, atol=1e-6)


def test_interp_matrix_rejects_empty_sizes():
    with pytest.raises(ValueError, match="sizes must be positive"):
        interp_matrix(0, 4)


# the DPT head's resizes (2x, 2x, to the input size), a downscale and degenerate sizes
SIZES = [((5, 7), (10, 14)), ((8, 8), (14, 14)), ((16, 16), (28, 28)), ((9, 6), (4, 3)), ((1, 5), (3, 1))]


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_resize_bilinear_matches_interpolate_values_and_grads(src, dst, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *src)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    want = F.interpolate(xa, dst, mode="bilinear", align_corners=True)
    got = resize_bilinear(xb, dst, matmul=True)
    assert got.shape == want.shape == (2, 3, *dst)
    fmt = torch.channels_last if channels_last and dst != (1, 1) else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last", [False, True])
def test_resize_bilinear_copies_no_layout_forward_or_backward(channels_last):
    """Both products read their input as stored: the head's resizes (channels-last in the GPU
    recipes) add no layout copies, which showed up as their own kernels in a GPU profile."""
    x = torch.randn(2, 8, 10, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with _RecordOps() as rec:
        y = resize_bilinear(x, (19, 23), matmul=True)
        y.backward(torch.ones(2, 19, 23, 8).permute(0, 3, 1, 2) if channels_last else torch.ones_like(y))
    copies = [op for op in rec.ops if "clone" in op or "copy" in op or "contiguous" in op]
    assert not copies, f"layout copies: {copies}"
    assert sum("mm" in op for op in rec.ops) == 4  # two products forward, two backward


def test_resize_bilinear_without_matmul_is_f_interpolate_itself():
    x = torch.randn(1, 2, 6, 6)
    want = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    assert torch.equal(resize_bilinear(x, (12, 12), matmul=False), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_in,n_out", [(37, 74), (9, 18), (74, 148), (148, 296), (296, 518), (7, 5)])
def test_half_precision_weights_sum_to_exactly_one(dtype, n_in, n_out):
    """Each row's weights, rounded one way, sum to exactly one: no gain error."""
    m = interp_matrix(n_in, n_out, dtype=dtype)
    assert m.dtype == dtype and torch.equal(m.double().sum(1), torch.ones(n_out, dtype=torch.float64))
    torch.testing.assert_close(m.float(), interp_matrix(n_in, n_out), rtol=0, atol=2 ** -8)


def test_bf16_resize_has_no_gain_bias():
    """Rounding both weights of a row separately scaled outputs by up to 0.2 %, always the same way
    at the same positions (mean signed error -1.9e-3 for 37 -> 74); what is left is the output's
    own rounding, which averages out. A constant map comes out exactly constant."""
    torch.manual_seed(0)
    x = (torch.rand(2, 8, 37, 37, dtype=torch.float64) + 0.5).to(torch.bfloat16)
    want = F.interpolate(x.double(), (74, 74), mode="bilinear", align_corners=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resize_bilinear(x, (74, 74)).double()
    assert abs(float(((got - want) / want).mean())) < 2e-4
    flat = torch.full((1, 3, 37, 37), 3.0, dtype=torch.bfloat16)
    assert torch.equal(resize_bilinear(flat, (74, 74)), torch.full((1, 3, 74, 74), 3.0, dtype=torch.bfloat16))


def test_resize_bilinear_under_bf16_autocast_within_bf16_noise():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12, 12)
    want = F.interpolate(x, (21, 21), mode="bilinear", align_corners=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resize_bilinear(x.to(torch.bfloat16), (21, 21), matmul=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_depth_model_picks_the_resize_path(monkeypatch):
    """Eager (and any CPU run) keeps F.interpolate; matmul_resize=True forces the matrix products."""
    import curriculum.model as model_module
    from curriculum.model import build_model

    seen = []
    real = model_module.resize_bilinear

    def recording(x, size, matmul=True):
        seen.append(matmul)
        return real(x, size, matmul=matmul)

    monkeypatch.setattr(model_module, "resize_bilinear", recording)
    model = build_model({"encoder": "tiny", "head": "log", "min_depth": 0.1, "max_depth": 1000.0}).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        model(x)
        assert seen and not any(seen)
        seen.clear()
        model.matmul_resize = True
        model(x)
    assert seen and all(seen)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_channel_projection_matches_the_convolution(bias, channels_last):
    from curriculum.layers import one_channel_projection

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 1, 1, bias=bias)
    x = torch.randn(2, 32, 9, 13)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = conv(xa), one_channel_projection(xb, conv)
    assert got.shape == want.shape == (2, 1, 9, 13)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [xa, *conv.parameters()], g)
    got_grads = torch.autograd.grad(got, [xb, *conv.parameters()], g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_one_channel_projection_rejects_other_convolutions():
    from curriculum.layers import one_channel_projection

    with pytest.raises(ValueError, match="1x1 convolution to one channel"):
        one_channel_projection(torch.randn(1, 4, 3, 3), torch.nn.Conv2d(4, 2, 1))


def test_depth_model_projects_by_channel_sums_only_when_compiled(monkeypatch):
    import curriculum.model as model_module
    from curriculum.model import build_model

    calls = []
    real = model_module.one_channel_projection
    monkeypatch.setattr(model_module, "one_channel_projection", lambda x, conv: calls.append(1) or real(x, conv))
    model = build_model({"encoder": "tiny", "head": "log", "min_depth": 0.1, "max_depth": 1000.0,
                         "uncertainty": True}).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        eager = model(x)
        assert not calls
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(x)
        torch._dynamo.reset()
    assert len(calls) == 2  # depth and uncertainty
    torch.testing.assert_close(compiled.depth, eager.depth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.uncertainty, eager.uncertainty, rtol=1e-5, atol=1e-6)
    calls.clear()
    model.sum_projection = True  # forced on, eager too
    with torch.no_grad():
        model(x)
    assert len(calls) == 2


def test_predictions_are_upsampled_corner_to_corner_as_depth_anything_does():
    """Depth-Anything-V2 resizes its output to the image with align_corners=True: the corner
    pixels keep the network's corner values exactly."""
    from curriculum.layers import upsample_depth

    pred = torch.rand(2, 5, 7) * 80
    up = upsample_depth(pred.to(torch.bfloat16), (23, 31))
    assert up.shape == (2, 23, 31) and up.dtype == torch.float32
    p = pred.to(torch.bfloat16).float()
    for (r, c), (R, C) in (((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)), ((-1, -1), (-1, -1))):
        assert torch.equal(up[:, R, C], p[:, r, c])
    # output row 1 reads input row 4/22 (align_corners=False would clamp it to row 0)
    t = 4 / 22
    assert torch.allclose(up[:, 1, 0], (1 - t) * p[:, 0, 0] + t * p[:, 1, 0])


@pytest.mark.parametrize("n_in,n_out", [(0, 4), (4, 0)])
def test_interp_matrix_rejects_empty_sizes_either_side(n_in, n_out):
    with pytest.raises(ValueError, match="sizes must be positive"):
        interp_matrix(n_in, n_out)
