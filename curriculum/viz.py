"""Depth and error images, and the figures of the dashboards and comparison report.

Colours use a fixed range (vmin, vmax) passed by the caller, never one fitted to the image, so
the same depth has the same colour in every run, image and arm. Depth defaults to a log scale
because the range spans about 1 to 655 m. Pixels without a depth are a fixed grey.

Figures are built on ``matplotlib.figure.Figure`` objects (Agg rendering), never through pyplot,
so nothing here changes matplotlib's global backend or leaks open figures; matplotlib is imported
lazily. Every file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.files import atomic_write

GREY = (128, 128, 128)  # pixels with no depth / no error to show


# ----------------------------------------------------------------------------- colour maps

@functools.lru_cache(maxsize=16)
def _lut(cmap: str) -> np.ndarray:
    """256 x 3 uint8 lookup table of a matplotlib colour map."""
    import matplotlib

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colour map {cmap!r}") from None
    rgba = cm(np.linspace(0.0, 1.0, 256))
    lut = np.round(rgba[:, :3] * 255.0).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def _normalise(values: np.ndarray, vmin: float, vmax: float, log_scale: bool) -> np.ndarray:
    """Values mapped to [0, 1] (clipped) on a linear or log scale; NaN where not mappable."""
    if not vmax > vmin:
        raise ValueError(f"vmax must be > vmin, got vmin={vmin}, vmax={vmax}")
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if log_scale:
            if not vmin > 0:
                raise ValueError(f"log scale needs vmin > 0, got {vmin}")
            t = (np.log(v) - math.log(vmin)) / (math.log(vmax) - math.log(vmin))
        else:
            t = (v - vmin) / (vmax - vmin)
        return np.clip(t, 0.0, 1.0)


def _apply_lut(t: np.ndarray, bad: np.ndarray, cmap: str) -> np.ndarray:
    lut = _lut(cmap)
    idx = np.round(np.nan_to_num(t, nan=0.0) * 255.0).astype(np.intp)
    out = lut[idx]
    out[bad] = GREY
    return out


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"{name} mask shape {mask.shape} differs from image shape {shape}")
    return mask


def colorize_depth(
    depth: np.ndarray,
    vmin: float,
    vmax: float,
    cmap: str = "turbo",
    log_scale: bool = True,
    invalid: np.ndarray | None = None,
) -> np.ndarray:
    """Colour image (H, W, 3) uint8 of a depth map (H, W) in metres, on the fixed range [vmin, vmax].

    Values beyond vmax take the top colour and below vmin the bottom one. +inf, NaN, depth <= 0
    and pixels where ``invalid`` is True are grey (128, 128, 128). To show +inf as "far" instead,
    replace it by vmax first (``depth_panel`` does so for ground truth).
    """
    depth = as_2d(depth, "depth")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(depth) | ~(depth > 0) | _check_mask(invalid, depth.shape, "invalid")
    return _apply_lut(_normalise(depth, vmin, vmax, log_scale), bad, cmap)


def colorize_error(
    abs_rel: np.ndarray,
    vmax: float = 0.5,
    invalid: np.ndarray | None = None,
    cmap: str = "magma",
) -> np.ndarray:
    """Colour image (H, W, 3) uint8 of a per-pixel relative error on the fixed range [0, vmax].

    Non-finite or negative values and ``invalid`` pixels are grey; values beyond vmax are clipped.
    """
    err = as_2d(abs_rel, "abs_rel")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(err) | (err < 0) | _check_mask(invalid, err.shape, "invalid")
    return _apply_lut(_normalise(err, 0.0, vmax, False), bad, cmap)


def depth_panel(
    rgb: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    valid: np.ndarray | None = None,
    error_vmax: float = 0.5,
    cmap: str = "turbo",
    log_scale: bool = True,
) -> np.ndarray:
    """One uint8 image: rgb | ground truth | prediction | abs-rel error, side by side (H, 4W, 3).

    Ground truth 0 or NaN (no measurement) is grey and +inf (beyond range / sky) is the top
    colour. The error |pred - gt| / gt is shown where gt is finite and > 0, the prediction is
    valid and, if given, ``valid`` is True; elsewhere grey. ``rgb`` is resized to the depth size
    if it differs.
    """
    gt = as_2d(gt, "gt")
    pred = as_2d(pred, "pred")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    rgb = _as_rgb_image(rgb, gt.shape)
    valid = ~_check_mask(None, gt.shape, "valid") if valid is None else _check_mask(valid, gt.shape, "valid")

    gt = gt.astype(np.float64)
    pred = pred.astype(np.float64)
    gt_shown = np.where(np.isposinf(gt), vmax, gt)
    with np.errstate(invalid="ignore", divide="ignore"):
        has_error = valid & np.isfinite(gt) & (gt > 0) & np.isfinite(pred) & (pred > 0)
        err = np.where(has_error, np.abs(pred - gt) / np.where(has_error, gt, 1.0), np.nan)
    return np.concatenate([
        rgb,
        colorize_depth(gt_shown, vmin, vmax, cmap=cmap, log_scale=log_scale),
        colorize_depth(pred, vmin, vmax, cmap=cmap, log_scale=log_scale),
        colorize_error(err, vmax=error_vmax, invalid=~has_error),
    ], axis=1)


# ----------------------------------------------------------------------------- files

def save_figure(fig: Any, path: str | os.PathLike, dpi: float | None = None, metadata: dict | None = None) -> Path:
    """Render a matplotlib Figure to ``path`` atomically; the format follows the suffix (default png)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, metadata=metadata))


def save_image(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (H, W, 3) or (H, W) image as it is (no figure), atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    fmt = (Path(path).suffix.lstrip(".").upper() or "PNG").replace("JPG", "JPEG")
    return atomic_write(path, lambda f: Image.fromarray(image).save(f, format=fmt))


def _depth_ticks(vmin: float, vmax: float) -> list[float]:
    """1-2-5 ticks within [vmin, vmax], plus 80 m (the fine-tuning range) when inside it."""
    ticks = [m * 10.0**e for e in range(-2, 6) for m in (1, 2, 5)]
    if vmin <= 80.0 <= vmax:
        # 80 m replaces 50 and 100, which would crowd it on a log bar.
        ticks = [t for t in ticks if not 0.6 * 80.0 <= t <= 80.0 / 0.6] + [80.0]
    return sorted(t for t in ticks if vmin <= t <= vmax)


DEPTH_PNG_SOFTWARE = "curriculum depth map"  # the PNG "Software" text of save_depth_png's figures


def fmt_is_png(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in ("", ".png")


def is_depth_png(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a depth figure written by ``save_depth_png`` (reads the header only)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == DEPTH_PNG_SOFTWARE
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False  # not ours; reading it as a photo reports what is wrong


def save_depth_png(
    depth: np.ndarray,
    path: str | os.PathLike,
    vmin: float,
    vmax: float,
    title: str | None = None,
    cmap: str = "turbo",
    log_scale: bool = True,
) -> Path:
    """PNG figure of the colour depth map with a colour bar labelled in metres, written atomically.

    The image is ``colorize_depth(depth, vmin, vmax, cmap, log_scale)`` drawn into the figure's
    axes (nearest neighbour, so within a few per cent of its size, not pixel for pixel: the values
    themselves are for ``--save-npy``); grey is "no depth".
    """
    from matplotlib.figure import Figure

    image = colorize_depth(depth, vmin, vmax, cmap=cmap, log_scale=log_scale)
    h, w = image.shape[:2]
    dpi = 100
    scale = max(1.0, 400.0 / max(h, w))  # small maps are enlarged so the figure stays readable
    fig = Figure(figsize=(w * scale / dpi + 1.4, h * scale / dpi + (0.6 if title else 0.3)),
                 dpi=dpi, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, parse_math=False)  # a file name may hold "$"
    _depth_colorbar(fig, ax, vmin, vmax, cmap, log_scale, fraction=0.05, pad=0.02)
    # marked, so that predict on a folder holding earlier outputs does not take them for photos
    return save_figure(fig, path, metadata={"Software": DEPTH_PNG_SOFTWARE} if fmt_is_png(path) else None)


def bar_chart(
    categories: Sequence[str],
    series: dict[str, Sequence[float]],
    path: str | os.PathLike,
    ylabel: str,
    title: str,
) -> Path:
    """Grouped bar chart (one group per category, one bar per series), written atomically.

    NaN (or missing) values draw no bar; an "n/a" label marks the slot instead, so an empty
    depth bin is not mistaken for a zero error.
    """
    from matplotlib.figure import Figure

    categories = [str(c) for c in categories]
    for name, values in series.items():
        if len(values) != len(categories):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(categories)} categories")
    n_series = max(1, len(series))
    width = 0.8 / n_series
    fig = Figure(figsize=(max(6.0, 1.5 + 0.3 * len(categories) * n_series), 4.0), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(categories), dtype=np.float64)
    for i, (name, values) in enumerate(series.items()):
        v = np.array([np.nan if val is None else val for val in values], dtype=np.float64)
        pos = x - 0.4 + width * (i + 0.5)
        ok = np.isfinite(v)
        ax.bar(pos[ok], v[ok], width=width, label=name)
        for p in pos[~ok]:
            ax.text(p, 0.0, "n/a", ha="center", va="bottom", rotation=90, fontsize="small", color="0.4")
    ax.set_xticks(x)
    ax.set_xticklabels(categories)
    ax.set_ylabel(ylabel)
    ax.set_title(title, parse_math=False)
    if series:
        ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def side_by_side(
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    path: str | os.PathLike,
    ncols: int | None = None,
    title: str | None = None,
    depth_bar: tuple[float, float] | None = None,
) -> Path:
    """Labelled row (or grid of ``ncols`` columns) of images, e.g. example predictions per arm.

    Images are uint8 (H, W, 3) or 2-D (shown in grey); sizes may differ. ``depth_bar=(vmin,
    vmax)`` adds the colour bar (metres, log scale) of maps made by ``colorize_depth`` with that
    range. Written atomically.
    """
    from matplotlib.figure import Figure

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("side_by_side needs at least one image")
    ncols = ncols or min(len(images), 4)
    nrows = math.ceil(len(images) / ncols)
    h, w = np.asarray(images[0]).shape[:2]
    panel_w = 4.0
    panel_h = panel_w * h / w + 0.4
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows + (0.4 if title else 0.0)), dpi=100,
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, label in zip(axes.flat, images, labels):
        image = np.asarray(image)
        if image.ndim == 2:
            ax.imshow(image, cmap="gray", interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(str(label), fontsize="medium", parse_math=False)
    if title:
        fig.suptitle(title, parse_math=False)
    if depth_bar is not None:
        _depth_colorbar(fig, axes, *depth_bar)
    return save_figure(fig, path)


def _depth_colorbar(fig: Any, axes: Any, vmin: float, vmax: float, cmap: str = "turbo", log_scale: bool = True,
                    fraction: float = 0.03, pad: float = 0.01) -> None:
    """A colour bar in metres beside ``axes`` (log scale: the ticks of ``_depth_ticks``)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, LogNorm, Normalize
    from matplotlib.ticker import FixedLocator, FormatStrFormatter

    norm = LogNorm(vmin=vmin, vmax=vmax) if log_scale else Normalize(vmin=vmin, vmax=vmax)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=ListedColormap(_lut(cmap) / 255.0)), ax=axes,
                       fraction=fraction, pad=pad)
    bar.set_label("depth [m]")
    ticks = _depth_ticks(vmin, vmax) if log_scale else []
    if len(ticks) >= 2:
        bar.ax.yaxis.set_major_locator(FixedLocator(ticks))
        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        bar.ax.minorticks_off()


# ----------------------------------------------------------------------------- helpers

def as_2d(a: np.ndarray, name: str) -> np.ndarray:
    """`a` as an (H, W) array (a (1, H, W) one squeezed); any other shape is refused by `name`."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (H, W), got shape {a.shape}")
    return a


def _as_rgb_image(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"rgb must be (H, W, 3), got shape {rgb.shape}")
    rgb = rgb[..., :3]
    if rgb.shape[:2] != shape:
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(
            (shape[1], shape[0]), Image.Resampling.BILINEAR))
    return rgb
