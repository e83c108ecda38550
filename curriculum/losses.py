"""Depth losses, computed in fp32 on the weights and targets a mask policy produced.

Every loss here is finite on any input and stays connected to the prediction: on an empty mask
(an all-sky crop under the 80 m policy) it returns a zero that still back-propagates, so every
parameter gets a (zero) gradient and DDP's gradient all-reduce never waits on a missing bucket.
Pixels whose prediction, target or weight is not finite, or whose prediction or target is <= 0,
are excluded whatever their weight.
"""

from __future__ import annotations

import torch

from curriculum.model import DepthPrediction

_TINY = 1e-12


def _graph_zero(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A scalar 0.0 that depends on every given tensor (NaN/inf in them cannot leak in)."""
    zero = None
    for t in tensors:
        if t is None:
            continue
        # Multiply before summing: a sum of large finite values can overflow to inf, and inf * 0 is NaN.
        z = torch.nan_to_num(t.float() * 0.0, nan=0.0).sum()
        zero = z if zero is None else zero + z
    if zero is None:
        raise ValueError("no tensor given")
    return zero


def _prepare(pred, target, weight):
    pred, target, weight = pred.float(), target.float(), weight.float()
    if pred.shape != target.shape or pred.shape != weight.shape:
        raise ValueError(
            f"pred, target and weight must have one shape, got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(weight.shape)}"
        )
    valid = (
        (weight > 0)
        & torch.isfinite(weight)
        & torch.isfinite(pred)
        & (pred > 0)
        & torch.isfinite(target)
        & (target > 0)
    )
    w = torch.where(valid, weight, torch.zeros_like(weight))
    one = torch.ones_like(pred)
    # log of 1.0 where excluded: finite values and finite (zero-weighted) gradients.
    g = torch.log(torch.where(valid, pred, one)) - torch.log(torch.where(valid, target, one))
    return w, g


def silog_loss(pred, target, weight, lam: float = 0.5, eps: float = 1e-8) -> torch.Tensor:
    """Depth-Anything-V2's SiLog, weighted and pooled over the whole batch.

    sqrt(mean_w(g^2) - lam * mean_w(g)^2) with g = log(pred) - log(target), evaluated in a
    cancellation-free form. The argument of the sqrt is clamped at ``eps``, so a perfect (or, with
    lam > 1, a negative-variance) case gives sqrt(eps) (1e-4 by default) with a zero gradient
    instead of NaN.
    """
    w, g = _prepare(pred, target, weight)
    wsum = w.sum()
    denom = wsum.clamp_min(_TINY)
    m1 = (w * g).sum() / denom
    # mean(g^2) - lam mean(g)^2 written as mean((g - mean g)^2) + (1 - lam) mean(g)^2: the same
    # value without the cancellation that makes the plain form round below zero.
    centred = (w * (g - m1) ** 2).sum() / denom
    loss = torch.sqrt((centred + (1.0 - lam) * m1 * m1).clamp_min(eps))
    loss = torch.where(wsum > 0, loss, torch.zeros_like(loss))
    return loss + _graph_zero(pred)


def laplace_nll(pred, target, weight, scale_b) -> torch.Tensor:
    """Weighted mean Laplace negative log-likelihood of the log-depth residual:
    |log pred - log target| / b + log b (the constant log 2 left out)."""
    w, g = _prepare(pred, target, weight)
    b = scale_b.float()
    if b.shape != g.shape:
        raise ValueError(f"scale_b must have the prediction's shape {tuple(g.shape)}, got {tuple(b.shape)}")
    ok = torch.isfinite(b) & (b > 0)
    w = torch.where(ok, w, torch.zeros_like(w))
    b_safe = torch.where(ok, b, torch.ones_like(b)).clamp_min(1e-6)
    nll = g.abs() / b_safe + torch.log(b_safe)
    wsum = w.sum()
    loss = (w * nll).sum() / wsum.clamp_min(_TINY)
    loss = torch.where(wsum > 0, loss, torch.zeros_like(loss))
    return loss + _graph_zero(pred, scale_b)


def gradient_matching_loss(pred, target, weight, scales: int = 4) -> torch.Tensor:
    """Multi-scale gradient matching on the log-depth residual (MiDaS / MegaDepth style).

    At scale s the maps are subsampled by 2**s; the loss is the weighted mean absolute difference
    of horizontally and vertically adjacent residuals, where both pixels are valid (pair weight =
    product of the pixel weights), averaged over the scales that have any valid pair. Inputs are
    (B, H, W) or (H, W). Scale-invariant: a global scale on pred changes nothing.
    """
    if scales < 1:
        raise ValueError(f"scales must be >= 1, got {scales}")
    w, g = _prepare(pred, target, weight)
    if g.ndim == 2:
        w, g = w[None], g[None]
    total = torch.zeros((), dtype=torch.float32, device=g.device)
    used = torch.zeros((), dtype=torch.float32, device=g.device)
    for s in range(scales):
        step = 2**s
        gs, ws = g[..., ::step, ::step], w[..., ::step, ::step]
        if gs.shape[-1] < 2 and gs.shape[-2] < 2:
            break
        num = torch.zeros_like(total)
        den = torch.zeros_like(total)
        for dim in (-1, -2):
            n = gs.shape[dim]
            if n < 2:
                continue
            a, b = gs.narrow(dim, 1, n - 1), gs.narrow(dim, 0, n - 1)
            pw = ws.narrow(dim, 1, n - 1) * ws.narrow(dim, 0, n - 1)
            num = num + (pw * (a - b).abs()).sum()
            den = den + pw.sum()
        has = den > 0
        total = total + torch.where(has, num / den.clamp_min(_TINY), torch.zeros_like(num))
        used = used + has.float()
    loss = torch.where(used > 0, total / used.clamp_min(1.0), torch.zeros_like(total))
    return loss + _graph_zero(pred)


def compute_loss(
    prediction: DepthPrediction,
    target: torch.Tensor,
    weight: torch.Tensor,
    silog_lambda: float = 0.5,
    grad_weight: float = 0.0,
    grad_scales: int = 4,
    nll_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Total training loss and its parts.

    Returns {"loss": total (with graph), "silog": ..., and "grad" when grad_weight > 0, "nll" when
    the prediction carries an uncertainty, "nonfinite_prediction": 1.0 when any predicted depth
    is NaN or infinite, else 0.0}; the parts are detached, for logging. The uncertainty is trained
    on the detached depth, so it estimates the error without changing the depth objective; its
    head is always connected to the total (a zero term when nll_weight is 0).

    The terms leave out pixels whose prediction is not finite, as they leave out bad targets; but
    a network that predicts NaN is broken, not its data: the total is then NaN, so the step is
    skipped and counted as a non-finite one (the terms alone gave a loss of 0 for a network
    predicting NaN everywhere, a perfect fit in the logs).
    """
    depth = prediction.depth
    broken = (~torch.isfinite(depth.detach().float())).any()
    parts: dict[str, torch.Tensor] = {}
    silog = silog_loss(depth, target, weight, lam=silog_lambda)
    total = silog
    parts["silog"] = silog.detach()
    if grad_weight > 0:
        grad = gradient_matching_loss(depth, target, weight, scales=grad_scales)
        total = total + grad_weight * grad
        parts["grad"] = grad.detach()
    if prediction.uncertainty is not None:
        nll = laplace_nll(depth.detach(), target, weight, prediction.uncertainty)
        total = total + nll_weight * nll + _graph_zero(prediction.uncertainty)
        parts["nll"] = nll.detach()
    total = total + torch.where(broken, torch.full_like(total, float("nan")), torch.zeros_like(total)).detach()
    parts["nonfinite_prediction"] = broken.float()
    return {"loss": total, **parts}
