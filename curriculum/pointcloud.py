"""Point clouds from predicted depth, and the filters that keep phantom points out of them.

A depth map predicted by a model trained only on <= 80 m puts the sky and far facades at
20-70 m; unprojected, those pixels become a wall of "phantom" points in front of the camera.
The filters here drop such points (and the usual flying pixels at depth edges) and report how
many each one removed, so a run can show where its points went.

Pixel convention: pixel (row v, column u) has its centre at integer coordinates (u, v); the
top-left pixel's centre is (0, 0). Camera coordinates are x right, y down, z forward, and depth
is planar z (along the optical axis), as in the shard schema:

    x = (u - cx) * z / fx,   y = (v - cy) * z / fy

Numpy only; plotting (``topdown_view``) imports matplotlib lazily.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from curriculum.viz import as_2d
from data_prep.files import atomic_write

Intrinsics = tuple[float, float, float, float]

# Order in which filter_points applies filters; a point removed by several filters counts
# against the first. Sky comes before the range cut so that sky points are reported as sky.
FILTER_ORDER = ("valid", "sky", "beyond", "edge", "uncertainty")  # "beyond": --drop-beyond

_PLY_DTYPE = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
)
_PLY_PROPERTIES = [("float", "x"), ("float", "y"), ("float", "z"),
                   ("uchar", "red"), ("uchar", "green"), ("uchar", "blue")]
# Accepted spellings of the two property types write_ply uses.
_PLY_TYPE_ALIASES = {"float": "float", "float32": "float", "uchar": "uchar", "uint8": "uchar"}


# ----------------------------------------------------------------------------- geometry

def intrinsics_from_fov(width: int, height: int, hfov_deg: float = 60.0) -> Intrinsics:
    """Pinhole intrinsics (fx, fy, cx, cy) for a horizontal field of view, square pixels.

    The principal point is the image centre in the integer pixel-centre convention,
    ((width - 1) / 2, (height - 1) / 2), so the centre pixel of an odd-sized image maps to the
    optical axis.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0.0 < hfov_deg < 180.0:
        raise ValueError(f"hfov_deg must be in (0, 180), got {hfov_deg}")
    fx = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    return fx, fx, (width - 1) / 2.0, (height - 1) / 2.0


def unproject(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Camera-space points (H, W, 3) float32 for a planar-z depth map (H, W) in metres.

    Pixel (v, u) has its centre at (u, v) (see module docstring). Non-finite depths give
    non-finite points; filter them with ``keep_valid``.
    """
    depth = as_2d(depth, "depth")
    h, w = depth.shape
    u = np.arange(w, dtype=np.float64)[None, :]
    v = np.arange(h, dtype=np.float64)[:, None]
    z = depth.astype(np.float64)
    with np.errstate(invalid="ignore"):
        x = (u - cx) * z / fx
        y = (v - cy) * z / fy
    return np.stack([x, y, z], axis=-1).astype(np.float32)


def project(points: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Pixel coordinates (..., 2) as (u, v) of camera-space points (..., 3); inverse of unproject."""
    points = np.asarray(points, dtype=np.float64)
    z = points[..., 2]
    return np.stack([points[..., 0] * fx / z + cx, points[..., 1] * fy / z + cy], axis=-1)


# ----------------------------------------------------------------------------- filters

def keep_valid(depth: np.ndarray) -> np.ndarray:
    """Keep-mask of pixels with a finite, positive depth."""
    depth = as_2d(depth, "depth")
    with np.errstate(invalid="ignore"):
        return np.isfinite(depth) & (depth > 0)


def keep_within(depth: np.ndarray, max_depth: float) -> np.ndarray:
    """Keep-mask of pixels with depth <= max_depth (NaN is dropped)."""
    depth = as_2d(depth, "depth")
    with np.errstate(invalid="ignore"):
        return depth <= max_depth


def keep_not_sky(depth: np.ndarray, sky_threshold: float | None = None,
                 sky_mask: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask dropping sky: depth at or beyond ``sky_threshold`` and/or ``sky_mask`` True.

    ``sky_threshold`` is typically the far end of the model's range (where it puts the sky);
    ``sky_mask`` is a bool (H, W) array, e.g. from ``load_mask``. With neither, keeps all.
    """
    depth = as_2d(depth, "depth")
    keep = np.ones(depth.shape, dtype=bool)
    if sky_threshold is not None:
        with np.errstate(invalid="ignore"):
            keep &= ~(depth >= sky_threshold)
    if sky_mask is not None:
        sky_mask = np.asarray(sky_mask)
        if sky_mask.shape != depth.shape:
            raise ValueError(f"sky mask shape {sky_mask.shape} differs from depth shape {depth.shape}")
        keep &= ~sky_mask.astype(bool)
    return keep


def load_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read a PNG mask as bool (H, W): nonzero (in any colour channel) is True; turned upright by its
    EXIF orientation, as predict's images are. A JPEG mask is lossy (its edges ring with small
    nonzero values around the sky): there a channel counts from half its range (128) up.

    Raises ValueError with one line naming the file if it cannot be read or its size is not
    ``shape`` (H, W).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            lossy = img.format in ("JPEG", "MPO")  # MPO: a phone camera's multi-picture JPEG
            img = ImageOps.exif_transpose(img)
            if img.mode in ("P", "PA"):  # palette indices are not colours: white sky may be index 0
                img = img.convert("RGBA")
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read mask {path}: {_one_line(e)}") from None
    if lossy:
        arr = arr >= 128
    if arr.ndim == 3:
        # Alpha says nothing about sky; ignore it when colour channels are present.
        if mode in ("RGBA", "LA", "PA") and arr.shape[2] > 1:
            arr = arr[..., :-1]
        arr = arr.any(axis=2)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]} (WxH), "
                         f"expected {shape[1]}x{shape[0]}")
    return arr.astype(bool)


def keep_not_edge(depth: np.ndarray, rel_threshold: float = 0.05, neighbours: int = 4, step: int = 1) -> np.ndarray:
    """Keep-mask dropping flying pixels at depth discontinuities.

    A pixel is dropped if max over its neighbours n of |d - d_n| / d exceeds ``rel_threshold``.
    ``neighbours`` is 4 or 8, ``step`` pixels away. A prediction resized up from the network's
    resolution by a factor k spreads each jump over about k pixels, every one-pixel step of the
    ramp under the threshold: ``step`` = ceil(k) compares across the whole ramp. Pixels on the image border compare only with neighbours that
    exist, and neighbours without a valid depth (non-finite or <= 0) are ignored, so holes in
    the measurement do not erode their surroundings. Invalid pixels themselves are kept here
    (``keep_valid`` is the filter for them).
    """
    if neighbours not in (4, 8):
        raise ValueError(f"neighbours must be 4 or 8, got {neighbours}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be a whole number of pixels >= 1, got {step!r}")
    depth = as_2d(depth, "depth").astype(np.float64)
    valid = keep_valid(depth)
    d = np.where(valid, depth, np.nan)
    h, w = d.shape
    k = int(step)
    padded = np.full((h + 2 * k, w + 2 * k), np.nan)
    padded[k:-k, k:-k] = d
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbours == 8:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    worst = np.zeros((h, w))
    with np.errstate(invalid="ignore"):
        for dy, dx in offsets:
            n = padded[k + k * dy:k + k * dy + h, k + k * dx:k + k * dx + w]
            rel = np.abs(d - n) / d
            worst = np.fmax(worst, rel)  # fmax ignores NaN (missing or invalid neighbour)
    return ~(worst > rel_threshold)


def keep_confident(uncertainty: np.ndarray, max_uncertainty: float) -> np.ndarray:
    """Keep-mask of pixels with uncertainty <= max_uncertainty (NaN is dropped).

    ``uncertainty`` is e.g. the predicted Laplace scale b in log-depth space; higher means less sure.
    """
    uncertainty = np.asarray(uncertainty)
    with np.errstate(invalid="ignore"):
        return uncertainty <= max_uncertainty


def filter_points(
    depth: np.ndarray,
    rgb: np.ndarray | None,
    intrinsics: Intrinsics,
    *,
    max_depth: float | None = None,
    sky_threshold: float | None = None,
    sky_mask: np.ndarray | str | os.PathLike | None = None,
    edge_threshold: float | None = None,
    edge_step: int = 1,
    uncertainty: np.ndarray | None = None,
    max_uncertainty: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Unproject ``depth`` and keep the points that pass the requested filters.

    Filters run in ``FILTER_ORDER`` (valid, sky, beyond ``max_depth``, edge, uncertainty); invalid depths are
    always removed. Returns points (N, 3) float32, colours (N, 3) uint8 and a report
    ``{"total", <each applied filter>, "kept"}`` where each filter's count is the points it
    removed that no earlier filter had removed, so ``kept + sum(filters) == total``.

    ``rgb`` is (H, W, 3) uint8 (None gives grey points). ``edge_step``: see ``keep_not_edge``. ``sky_mask`` may be a bool array or a
    PNG path (see ``load_mask``). Edge and uncertainty filters are judged on the full maps, not
    on what earlier filters left.
    """
    depth = as_2d(depth, "depth")
    shape = depth.shape
    colours = _as_rgb(rgb, shape)
    if len(intrinsics) != 4 or not all(math.isfinite(v) for v in intrinsics) or not min(intrinsics[:2]) > 0:
        # a NaN centre would make every point NaN while the report says all were kept
        raise ValueError(f"intrinsics must be finite (fx, fy, cx, cy) with fx, fy > 0, got {intrinsics!r}")
    if (uncertainty is None) != (max_uncertainty is None):
        raise ValueError("uncertainty and max_uncertainty must be given together")
    if isinstance(sky_mask, (str, os.PathLike)):
        sky_mask = load_mask(sky_mask, shape)

    masks: dict[str, np.ndarray] = {"valid": keep_valid(depth)}
    if sky_threshold is not None or sky_mask is not None:
        masks["sky"] = keep_not_sky(depth, sky_threshold=sky_threshold, sky_mask=sky_mask)
    if max_depth is not None:
        masks["beyond"] = keep_within(depth, max_depth)
    if edge_threshold is not None:
        masks["edge"] = keep_not_edge(depth, edge_threshold, step=edge_step)
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty)
        if uncertainty.shape != shape:
            raise ValueError(f"uncertainty shape {uncertainty.shape} differs from depth shape {shape}")
        masks["uncertainty"] = keep_confident(uncertainty, max_uncertainty)

    report: dict[str, int] = {"total": int(depth.size)}
    keep = np.ones(shape, dtype=bool)
    for name in FILTER_ORDER:
        if name in masks:
            removed = keep & ~masks[name]
            report[name] = int(removed.sum())
            keep &= ~removed
    report["kept"] = int(keep.sum())

    points = unproject(depth, *intrinsics)[keep]
    return points.astype(np.float32, copy=False), colours[keep], report


def format_filter_report(report: dict[str, int]) -> str:
    """One line per entry of a ``filter_points`` report, with the share of the total."""
    total = report.get("total", 0)
    # each row names what it removed; the "valid" mask removes invalid depths
    shown = {name: ("invalid depth" if name == "valid" else name) for name in report}
    width = max(len(v) for v in shown.values()) if report else 0
    lines = []
    for name, count in report.items():
        label = shown[name]
        if name == "total":
            lines.append(f"{label:<{width}}  {count:>10d}")
        else:
            share = 100.0 * count / total if total else 0.0
            verb = "kept" if name == "kept" else "removed"
            lines.append(f"{label:<{width}}  {count:>10d}  ({share:5.1f}% {verb})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- PLY

def _write_vertices(f: IO[bytes], vertices: np.ndarray) -> None:
    # Chunked so that very large clouds are not copied into one huge bytes object.
    step = 1 << 20
    for start in range(0, len(vertices), step):
        f.write(vertices[start:start + step].tobytes())


def write_ply(path: str | os.PathLike, points: np.ndarray, colors: np.ndarray) -> Path:
    """Write a binary_little_endian 1.0 PLY (x, y, z float; red, green, blue uchar), atomically."""
    points = np.asarray(points)
    colors = np.asarray(colors)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {points.shape}")
    if colors.shape != points.shape:
        raise ValueError(f"colors must be (N, 3) like points {points.shape}, got {colors.shape}")
    if colors.dtype != np.uint8:
        raise ValueError(f"colors must be uint8, got {colors.dtype}")
    vertices = np.empty(len(points), dtype=_PLY_DTYPE)
    for i, axis in enumerate("xyz"):
        vertices[axis] = points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = colors[:, i]
    header = "ply\nformat binary_little_endian 1.0\n"
    header += f"element vertex {len(vertices)}\n"
    header += "".join(f"property {t} {n}\n" for t, n in _PLY_PROPERTIES)
    header += "end_header\n"

    def write(f: IO[bytes]) -> None:
        f.write(header.encode("ascii"))
        _write_vertices(f, vertices)

    return atomic_write(path, write)


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a PLY written by ``write_ply``: points (N, 3) float32, colours (N, 3) uint8.

    Any other layout (ascii, big endian, other properties, extra elements, truncated body) is
    refused with a one-line ValueError naming the file.
    """
    path = Path(path)
    data = path.read_bytes()

    def refuse(why: str) -> ValueError:
        return ValueError(f"{path}: unsupported PLY ({why}); expected binary_little_endian 1.0 "
                          "with float x,y,z and uchar red,green,blue")

    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise refuse("no 'ply' magic or no end_header")
    body_start = end + len(b"end_header\n")
    try:
        lines = data[:end].decode("ascii").splitlines()[1:]
    except UnicodeDecodeError:
        raise refuse("header is not ascii") from None
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("comment", "obj_info"))]
    if not lines or lines[0] != "format binary_little_endian 1.0":
        raise refuse(f"format is {lines[0]!r}" if lines else "no format line")
    elements = [ln for ln in lines[1:] if ln.startswith("element")]
    parts = lines[1].split() if len(lines) > 1 else []
    if len(elements) != 1 or len(parts) != 3 or parts[:2] != ["element", "vertex"]:
        raise refuse("expected exactly one 'element vertex N'")
    try:
        count = int(parts[2])
    except ValueError:
        raise refuse(f"bad vertex count {parts[2]!r}") from None
    props = []
    for ln in lines[2:]:
        p = ln.split()
        if len(p) != 3 or p[0] != "property":
            raise refuse(f"unexpected header line {ln!r}")
        props.append((_PLY_TYPE_ALIASES.get(p[1], p[1]), p[2]))
    if props != _PLY_PROPERTIES:
        raise refuse("properties are " + ", ".join(f"{t} {n}" for t, n in props))
    body = data[body_start:]
    if len(body) != count * _PLY_DTYPE.itemsize:
        raise refuse(f"body is {len(body)} bytes, {count} vertices need {count * _PLY_DTYPE.itemsize}")
    vertices = np.frombuffer(body, dtype=_PLY_DTYPE, count=count)
    points = np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1).astype(np.float32)
    colours = np.stack([vertices["red"], vertices["green"], vertices["blue"]], axis=1)
    return points, colours


# ----------------------------------------------------------------------------- plotting

def topdown_view(
    points: np.ndarray,
    colors: np.ndarray | None,
    ax_or_path: Any,
    max_range: float = 100.0,
    title: str | None = None,
    line_at: float = 80.0,
    max_points: int = 200_000,
) -> Any:
    """Bird's-eye scatter of a point cloud: x (right) horizontally, z (forward) vertically.

    Shows phantom points: sky placed at 20-80 m appears as a band in front of the camera. A dashed
    line marks ``line_at`` (the 80 m fine-tuning range). Points beyond ``max_range`` are counted
    in the legend rather than drawn. Clouds larger than ``max_points`` are subsampled with a
    fixed seed so plots of the same cloud are identical.

    ``ax_or_path`` is a matplotlib Axes (drawn into and returned) or a path (a PNG is written
    atomically and the path returned).
    """
    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    if colors is None:
        rgba = np.full((len(points), 3), 0.3)
    else:
        rgba = np.asarray(colors).reshape(-1, 3).astype(np.float32) / 255.0
        if len(rgba) != len(points):
            raise ValueError(f"{len(rgba)} colours for {len(points)} points")
    x, z = points[:, 0], points[:, 2]
    beyond = int((z > max_range).sum())
    shown = np.flatnonzero(z <= max_range)
    if len(shown) > max_points:
        shown = np.sort(np.random.default_rng(0).choice(shown, max_points, replace=False))

    def draw(ax: Any) -> None:
        ax.scatter(x[shown], z[shown], c=rgba[shown], s=1.0, marker=".", linewidths=0, rasterized=True)
        ax.axhline(line_at, color="k", linestyle="--", linewidth=1.0, label=f"{line_at:g} m")
        ax.plot([], [], " ", label=f"{beyond} points beyond {max_range:g} m")
        ax.set_xlim(-max_range / 2.0, max_range / 2.0)
        ax.set_ylim(0.0, max_range)
        ax.set_aspect("equal")
        ax.set_xlabel("x [m] (right)")
        ax.set_ylabel("z [m] (forward)")
        ax.legend(loc="upper right", fontsize="small")
        if title:
            ax.set_title(title, parse_math=False)

    if hasattr(ax_or_path, "scatter"):
        draw(ax_or_path)
        return ax_or_path
    from matplotlib.figure import Figure

    from curriculum.viz import save_figure

    fig = Figure(figsize=(6, 6), dpi=100)
    draw(fig.add_subplot(1, 1, 1))
    return save_figure(fig, ax_or_path)


# ----------------------------------------------------------------------------- helpers

def _as_rgb(rgb: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if rgb is None:
        return np.full((*shape, 3), 200, dtype=np.uint8)
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    elif rgb.ndim == 3 and rgb.shape[2] == 4:
        rgb = rgb[..., :3]
    if rgb.shape != (*shape, 3):
        raise ValueError(f"rgb must be {(*shape, 3)} to match depth, got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")
    return rgb


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
