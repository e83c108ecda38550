"""Bilinear resizing (``align_corners=True``) as two matrix products.

The DPT head upsamples its largest feature maps three times (2x, 2x, then to the input size).
``F.interpolate`` runs those in fp32 under autocast, and its backward scatters with atomic adds:
on an H200 that scatter alone took a third of a vits training step, eagerly or compiled.
Bilinear resizing is separable and linear, so ``y = A_h @ x @ A_w^T`` with two small
interpolation matrices gives the same values (to rounding) with a backward that is two matrix
products as well, on tensor cores and in the autocast dtype. ``DepthModel`` uses it when compiled
for CUDA: vits went from 390 to 511 img/s. Eager, the layout copies the first version made around
the products cost more than the atomics save (330 against 355 img/s), so eager keeps
``F.interpolate``. The products now read and write each layout as stored (channels-last too) and
make no copies; that version is not yet timed on a GPU.

Known limit: the matrices are dense, so the FLOPs grow with in x out along each axis; that is
negligible for the head's sizes (about 2 % of a vitl step) and wasteful for huge resizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def interp_matrix(n_in: int, n_out: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation with ``align_corners=True``.

    Source positions and weights are computed in fp32 exactly as PyTorch's CUDA and CPU
    kernels do (``scale = (n_in - 1) / (n_out - 1)``, ``src = scale * dst``). In a half-precision
    ``dtype`` each row still sums to exactly 1: the larger of its two weights is rounded and the
    smaller is its exact complement (a multiple of the larger's spacing, so representable).
    Rounding both separately would scale every output by up to 0.2 % in bf16, in a pattern
    that repeats along the axis: a gain error, not noise.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"interp_matrix: sizes must be positive, got {n_in} -> {n_out}")
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, device=device, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
    i0 = src.floor().clamp_(max=n_in - 1)
    frac = src - i0
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w0, w1 = 1.0 - frac, frac
    if torch.finfo(dtype).bits < 32:
        first_larger = w0 >= w1
        larger = torch.where(first_larger, w0, w1).to(dtype).float()
        w0, w1 = torch.where(first_larger, larger, 1.0 - larger), torch.where(first_larger, 1.0 - larger, larger)
    cols = torch.arange(n_in, device=device, dtype=torch.float32)
    m = (cols[None, :] == i0[:, None]) * w0[:, None] + (cols[None, :] == i1[:, None]) * w1[:, None]
    return m.to(dtype)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], matmul: bool = True) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` for (B, C, H, W) input.

    ``matmul=False`` calls ``F.interpolate`` itself (the reference). The output keeps the input's
    memory format.
    """
    ho, wo = int(size[0]), int(size[1])
    if not matmul:
        return F.interpolate(x, (ho, wo), mode="bilinear", align_corners=True)
    b, c, h, w = x.shape
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    a_w = interp_matrix(w, wo, x.device, x.dtype)  # (wo, w)
    a_h = interp_matrix(h, ho, x.device, x.dtype)  # (ho, h)
    # Each product reads its input in the layout it is stored in and writes the next in the layout
    # the next one reads, so neither direction (nor the backward, A^T @ grad) copies a layout.
    if channels_last:
        hwc = x.permute(0, 2, 3, 1)  # (b, h, w, c), a view of the storage
        y = torch.matmul(a_w, hwc)  # (b, h, wo, c): (wo, w) @ (w, c) for every row
        y = torch.matmul(a_h, y.reshape(b, h, wo * c))  # (b, ho, wo * c): (ho, h) @ (h, wo * c) per image
        return y.view(b, ho, wo, c).permute(0, 3, 1, 2)  # (b, c, ho, wo), channels-last strides
    y = torch.matmul(x.contiguous(), a_w.t())  # (b, c, h, wo): one (b * c * h, w) @ (w, wo) product
    return torch.matmul(a_h, y)  # (b, c, ho, wo): (ho, h) @ (h, wo) per channel


def one_channel_projection(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution to one channel, written as a weighted sum over channels.

    The heads end in such a convolution, run in fp32 on an fp32 copy of a full-resolution feature
    map. Compiled, the convolution is an external kernel: inductor writes that fp32 copy out (in a
    layout chosen to match the one-channel output, which the convolution then copies again), and
    the backward writes an fp32 gradient map of the same size. As a sum it fuses with the cast and
    the ReLU before it into one reduction that reads the bf16 map once. Same values to fp32
    rounding; ``DepthModel`` uses it when compiled, eager keeps the convolution (bit-identical runs).
    """
    if conv.kernel_size != (1, 1) or conv.out_channels != 1 or conv.groups != 1:
        raise ValueError(f"one_channel_projection needs a 1x1 convolution to one channel, got {conv}")
    y = (x * conv.weight.reshape(1, -1, 1, 1)).sum(1, keepdim=True)
    return y if conv.bias is None else y + conv.bias.reshape(1, 1, 1, 1)


def upsample_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (B, H, W) prediction resized to ``size`` (B, h, w) in fp32: bilinear with
    ``align_corners=True``, as Depth-Anything-V2 resizes its output to the image (``infer_image``)
    and to the ground truth in its evaluation, so official checkpoints give the same maps here."""
    return F.interpolate(depth.float()[:, None], size=tuple(size), mode="bilinear", align_corners=True)[:, 0]
