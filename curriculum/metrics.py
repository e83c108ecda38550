"""Evaluation metrics: Depth-Anything-V2's per-image definitions, averaged over images.

Per image (``depth_metrics``), on the valid pixels: d1/d2/d3 = fraction with
max(pred/gt, gt/pred) < 1.25^k; abs_rel = mean |pred-gt|/gt; sq_rel = mean (pred-gt)^2/gt;
rmse; rmse_log = sqrt(mean g^2) and silog = sqrt(mean g^2 - 0.5 mean(g)^2) with
g = ln pred - ln gt (no factor 100); log10 = mean |log10 pred - log10 gt|.

``MetricAccumulator`` sums those per-image values and image counts per pixel group, so the sums
can be all-reduced across DDP ranks and every image counts once; groups:
- ``near``: measured, not sky, min_depth <= gt <= max_depth (Depth-Anything-V2's evaluation set),
  and its bins ``near/0_20`` [0, 20), ``near/20_40`` [20, 40), ``near/40_80`` [40, 80];
- ``far``: measured finite gt > max_depth, not sky (KITTI lidar reaches past 80 m).
Plus the phantom rate: among pixels whose ground truth is beyond max_depth (finite or +inf) or
sky, the fraction predicted at or within max_depth (points that pollute a point cloud), pooled
over pixels, overall and split into ``far/`` (finite gt beyond max_depth) and ``sky/`` (sky or
+inf). A group without any image, or a phantom rate without any pixel, is reported as NaN.

A non-finite prediction (NaN, +-inf) is counted in ``nonfinite_pixels`` (over the valid pixels),
left out of the error metrics (one NaN would otherwise make a whole range NaN, shown as "n/a" like
a range without images) and, on a far or sky pixel, counted as a phantom: it is no correct answer.
"""

from __future__ import annotations

import math

import torch

METRIC_NAMES = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
RANGE_BINS = (("0_20", 0, 20), ("20_40", 20, 40), ("40_80", 40, 80))  # 40_80 includes 80
# An image counts in a group (near, a range bin, far) only with at least this many of its pixels
# there, as Depth-Anything-V2's evaluation skips images with fewer than 10 valid pixels: a handful
# of pixels would otherwise weigh as much as a whole image in the per-image average.
MIN_PIXELS = 10
GROUPS = ("near",) + tuple(f"near/{name}" for name, _, _ in RANGE_BINS) + ("far",)
PHANTOM_KINDS = ("", "far/", "sky/")
PROTOCOLS = ("none", "synthetic", "kitti_garg", "kitti_eigen", "nyu")


def _metric_vector(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    pred = pred.double().clamp_min(1e-9)  # a zero prediction is a huge error, not a NaN
    gt = gt.double()
    ratio = torch.maximum(gt / pred, pred / gt)
    diff = pred - gt
    g = torch.log(pred) - torch.log(gt)
    mg = g.mean()
    mg2 = (g * g).mean()
    return torch.stack(
        [
            (ratio < 1.25).double().mean(),
            (ratio < 1.25**2).double().mean(),
            (ratio < 1.25**3).double().mean(),
            (diff.abs() / gt).mean(),
            (diff * diff / gt).mean(),
            torch.sqrt((diff * diff).mean()),
            torch.sqrt(mg2),
            (torch.log10(pred) - torch.log10(gt)).abs().mean(),
            # mean(g^2) - 0.5 mean(g)^2, in a form that cannot round below zero
            torch.sqrt(((g - mg) ** 2).mean() + 0.5 * mg * mg),
        ]
    )


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of one image over ``valid`` pixels (ANDed with gt finite and > 0).

    Computed in float64; predictions are clamped at 1e-9 m. Raises ValueError if no pixel is left.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    mask = torch.isfinite(gt) & (gt > 0)
    if valid is not None:
        if valid.shape != gt.shape:
            raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(gt.shape)}")
        mask = mask & valid.to(torch.bool)
    if not bool(mask.any()):
        raise ValueError("depth_metrics: no valid pixel")
    values = _metric_vector(pred[mask], gt[mask]).tolist()
    return dict(zip(METRIC_NAMES, values))


class MetricAccumulator:
    """Per-image metric sums and counts per group, plus pooled phantom-pixel counts.

    ``state()`` is a flat float64 vector of every sum and count (fixed length and order, see
    ``state_names()``); to reduce across DDP ranks, all_reduce(SUM) it and ``load_state`` the result.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 80.0, min_pixels: int = MIN_PIXELS):
        if not (0 < min_depth < max_depth):
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.min_pixels = int(min_pixels)  # a group counts for an image with at least this many pixels
        self.reset()

    # -- state --------------------------------------------------------------------------------

    @staticmethod
    def state_names() -> list[str]:
        names = ["images"]
        for grp in GROUPS:
            names += [f"{grp}/{m}" for m in METRIC_NAMES] + [f"{grp}/images"]
        for kind in PHANTOM_KINDS:
            names += [f"{kind}phantom_pixels", f"{kind}beyond_pixels"]
        return names + ["nonfinite_pixels"]

    def reset(self) -> None:
        self._state = torch.zeros(len(self.state_names()), dtype=torch.float64)
        self._index = {n: i for i, n in enumerate(self.state_names())}

    def state(self, device: torch.device | str | None = None) -> torch.Tensor:
        s = self._state.clone()
        return s if device is None else s.to(device)

    def load_state(self, t: torch.Tensor) -> None:
        t = torch.as_tensor(t).detach().to("cpu", torch.float64).flatten()
        if t.numel() != self._state.numel():
            raise ValueError(f"state has {t.numel()} entries, expected {self._state.numel()}")
        self._state = t.clone()

    def merge(self, other: "MetricAccumulator") -> "MetricAccumulator":
        if (other.min_depth, other.max_depth) != (self.min_depth, self.max_depth):
            raise ValueError("cannot merge accumulators with different depth ranges")
        self._state += other._state
        return self

    def _add(self, name: str, value: float) -> None:
        self._state[self._index[name]] += value

    # -- update -------------------------------------------------------------------------------

    def update(self, pred, depth, sky=None, valid=None) -> None:
        """Add a batch: pred, depth (B,H,W) metres (0 none, +inf beyond range), sky and valid
        (B,H,W) bool; ``valid`` False drops a pixel entirely (crop, padding)."""
        if pred.ndim == 2:
            pred, depth = pred[None], depth[None]
            sky = None if sky is None else sky[None]
            valid = None if valid is None else valid[None]
        if pred.shape != depth.shape:
            raise ValueError(f"pred and depth shapes differ: {tuple(pred.shape)} vs {tuple(depth.shape)}")
        for b in range(pred.shape[0]):
            self._update_image(
                pred[b].detach(),
                depth[b].detach(),
                None if sky is None else sky[b].to(torch.bool),
                None if valid is None else valid[b].to(torch.bool),
            )

    def _update_image(self, pred, gt, sky, valid) -> None:
        gt = gt.float()
        keep = torch.ones_like(gt, dtype=torch.bool) if valid is None else valid
        not_sky = keep if sky is None else keep & ~sky
        is_sky = torch.zeros_like(keep) if sky is None else keep & sky
        finite = torch.isfinite(pred)
        self._add("nonfinite_pixels", float((keep & ~finite).sum()))
        measured = not_sky & torch.isfinite(gt) & (gt > 0)
        near = measured & (gt >= self.min_depth) & (gt <= self.max_depth)
        groups = {"near": near, "far": measured & (gt > self.max_depth)}
        for name, lo, hi in RANGE_BINS:
            upper = gt <= hi if hi == RANGE_BINS[-1][2] else gt < hi
            groups[f"near/{name}"] = near & (gt >= lo) & upper

        self._add("images", 1.0)
        for grp in GROUPS:
            mask = groups[grp] & finite  # the count above reports the non-finite ones
            if int(mask.sum()) < self.min_pixels:
                continue
            values = _metric_vector(pred[mask], gt[mask]).tolist()
            for m, v in zip(METRIC_NAMES, values):
                self._add(f"{grp}/{m}", v)
            self._add(f"{grp}/images", 1.0)

        sky_like = is_sky | (keep & torch.isposinf(gt))
        far_finite = groups["far"]
        # a non-finite prediction there is a failure too (NaN <= max_depth alone would pass it)
        inside = (pred <= self.max_depth) | ~finite
        for kind, mask in (("", sky_like | far_finite), ("far/", far_finite), ("sky/", sky_like)):
            self._add(f"{kind}beyond_pixels", float(mask.sum()))
            self._add(f"{kind}phantom_pixels", float((mask & inside).sum()))

    # -- results ------------------------------------------------------------------------------

    def compute(self) -> dict[str, float]:
        s = dict(zip(self.state_names(), self._state.tolist()))
        out: dict[str, float] = {"images": s["images"]}
        for grp in GROUPS:
            n = s[f"{grp}/images"]
            for m in METRIC_NAMES:
                out[f"{grp}/{m}"] = s[f"{grp}/{m}"] / n if n > 0 else math.nan
            out[f"{grp}/images"] = n
        for kind in PHANTOM_KINDS:
            total = s[f"{kind}beyond_pixels"]
            out[f"{kind}phantom_rate"] = s[f"{kind}phantom_pixels"] / total if total > 0 else math.nan
            out[f"{kind}beyond_pixels"] = total
        out["nonfinite_pixels"] = s["nonfinite_pixels"]
        return out


def eval_crop(h: int, w: int, protocol: str, device=None) -> torch.Tensor:
    """Bool (h, w) mask of the pixels a protocol evaluates.

    kitti_garg: rows [0.40810811h, 0.99189189h), cols [0.03594771w, 0.96405229w) (Garg et al.);
    kitti_eigen: rows [0.3324324h, 0.91351351h), same cols; nyu: rows 45:471, cols 41:601 of a
    480x640 image; none / synthetic: every pixel. Bounds are truncated to int, as in monodepth2.
    """
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    if protocol in ("none", "synthetic"):
        mask[:] = True
    elif protocol in ("kitti_garg", "kitti_eigen"):
        top, bottom = (0.40810811, 0.99189189) if protocol == "kitti_garg" else (0.3324324, 0.91351351)
        mask[int(top * h) : int(bottom * h), int(0.03594771 * w) : int(0.96405229 * w)] = True
    elif protocol == "nyu":
        if (h, w) != (480, 640):
            raise ValueError(f"the nyu crop needs a 480x640 image, got {h}x{w}")
        mask[45:471, 41:601] = True
    else:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    return mask
