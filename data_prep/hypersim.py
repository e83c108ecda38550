"""Hypersim -> shards.

``python -m data_prep.hypersim --root ROOT --out DIR [--depth-scale 0.001] [--fov-deg 60]``

Reads the published layout::

    ROOT/<scene>/images/scene_<cam>_final_preview/frame.IIII.tonemap.jpg
    ROOT/<scene>/images/scene_<cam>_geometry_hdf5/frame.IIII.depth_meters.hdf5   (key 'dataset')

``depth_meters`` holds the Euclidean distance from the optical centre along each pixel's ray,
not planar depth; it is converted per pixel to planar z = dist * f / sqrt(x^2 + y^2 + f^2),
with x = u - cx, y = v - cy. Hypersim's camera has a 60 degree horizontal field of view and the
principal point at the image centre: f = (W / 2) / tan(fov / 2) (886.81 px at 1024 wide),
cx = (W - 1) / 2, cy = (H - 1) / 2 in pixel-centre coordinates. NaN marks rays that hit no
geometry: no measurement (0); Hypersim has no infinities, so a file holding one is a bad frame.
Depth is stored in millimetres by default (depth_scale 0.001, up to 65.534 m); a frame deeper
than that is reported as bad, naming the file: raise --depth-scale for such scenes. Hypersim
has no sky label, so no sky.png is written.

Known limit: that camera model is the one Hypersim documents for most scenes; some scenes were
rendered with tilt-shift (off-centre) cameras, whose true principal point and ray directions
come from the scene's metadata_camera_parameters.csv, which this converter does not read. For
those scenes the stored cx, cy and the planar conversion are off; leave them out or check them.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np

from . import convert
from .arguments import ArgumentParser
from .convert import Frame, bad
from .schema import SampleError, depth_to_raw, make_key

SOURCE = "hypersim"
DEPTH_SCALE = 0.001
FOV_DEG = 60.0
_JPG_RE = re.compile(r"^frame\.(\d+)\.tonemap\.jpg$")
_DIR_RE = re.compile(r"^scene_(.+)_final_preview$")


def intrinsics(width: int, height: int, fov_deg: float = FOV_DEG) -> tuple[float, float, float, float]:
    f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return f, f, (width - 1) / 2.0, (height - 1) / 2.0


def ray_to_planar(dist: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Distance along each pixel's ray -> depth along the optical axis (NaN stays NaN)."""
    h, w = dist.shape
    x = (np.arange(w, dtype=np.float64) - cx) / fx
    y = (np.arange(h, dtype=np.float64) - cy) / fy
    cos = 1.0 / np.sqrt(x[None, :] ** 2 + y[:, None] ** 2 + 1.0)
    return dist.astype(np.float64) * cos


def read_distance(path: Path) -> np.ndarray:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise bad(path, "missing file")
    try:
        with h5py.File(path, "r") as f:
            if not isinstance(f.get("dataset"), h5py.Dataset):
                raise bad(path, "no 'dataset' array in the HDF5 file")
            d = f["dataset"][()]
    except SampleError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        # h5py raises ValueError, TypeError or KeyError, not only OSError, for damaged headers
        raise bad(path, f"unreadable HDF5 ({' '.join(str(e).split()) or type(e).__name__})") from None
    if not isinstance(d, np.ndarray) or d.ndim != 2 or not np.issubdtype(d.dtype, np.floating):
        what = f"{d.dtype} {d.shape}" if isinstance(d, np.ndarray) else type(d).__name__
        raise bad(path, f"expected a 2-D float array, got {what}")
    # Hypersim marks rays that hit nothing with NaN only; an infinity is a broken file, and
    # would otherwise be stored as 65535 (beyond range)
    inf = np.isinf(d)
    if inf.any():
        raise bad(path, f"depth has {int(inf.sum())} infinite pixels (Hypersim marks no geometry with NaN)")
    return d


def find_frames(root: Path) -> list[Frame]:
    frames = []
    for prev in sorted(root.glob("*/images/scene_*_final_preview")):
        m = _DIR_RE.match(prev.name)
        if not m or not prev.is_dir():
            continue
        cam = m.group(1)
        scene = prev.parents[1].name
        geo = prev.parent / f"scene_{cam}_geometry_hdf5"
        for jpg in sorted(prev.iterdir()):
            mm = _JPG_RE.match(jpg.name)
            if not mm:
                continue
            idx = mm.group(1)
            frames.append(Frame(
                label=str(jpg),
                paths={"rgb": str(jpg), "depth": str(geo / f"frame.{idx}.depth_meters.hdf5")},
                params={"scene": scene, "camera": cam, "frame": idx},
            ))
    return frames


def load(frame: Frame, opts: dict) -> dict:
    p, q = frame.paths, frame.params
    rgb, rgb_bytes, rgb_fmt = convert.read_rgb(Path(p["rgb"]))
    dist = read_distance(Path(p["depth"]))
    convert.check_same_size(rgb, p["rgb"], dist, p["depth"])
    h, w = dist.shape
    fx, fy, cx, cy = intrinsics(w, h, opts.get("fov_deg", FOV_DEG))
    z = ray_to_planar(dist, fx, fy, cx, cy)
    z[np.isnan(z)] = 0.0  # Hypersim: NaN = the ray hit no geometry
    scale = opts.get("depth_scale", DEPTH_SCALE)
    raw = depth_to_raw(z, scale, name=p["depth"])
    frame_id = f"{q['camera']}-{q['frame']}"
    meta = {"source": SOURCE, "scene": q["scene"], "frame": frame_id, "width": w, "height": h,
            "fx": fx, "fy": fy, "cx": cx, "cy": cy, "depth_scale": scale}
    return convert.encode_frame(opts, make_key(SOURCE, q["scene"], frame_id), rgb, rgb_bytes, rgb_fmt, raw, meta)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m data_prep.hypersim", description="Hypersim -> shards")
    ap.add_argument("--root", type=Path, required=True, help="folder holding the scene folders (ai_001_001, ...)")
    ap.add_argument("--depth-scale", type=float, default=DEPTH_SCALE,
                    help="metres per raw unit in depth.png (default 0.001: mm, up to 65.534 m)")
    ap.add_argument("--fov-deg", type=float, default=FOV_DEG, help="horizontal field of view (default 60)")
    convert.add_common_args(ap)
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        return convert.fail(f"{args.root}: not a folder")
    if not (math.isfinite(args.depth_scale) and args.depth_scale > 0 and 0 < args.fov_deg < 180):
        return convert.fail("--depth-scale must be > 0 and --fov-deg in (0, 180)")
    try:
        frames = find_frames(args.root)
    except OSError as e:
        return convert.fail(f"{e.filename or args.root}: {e.strerror or e}")
    if not frames:
        return convert.fail(f"{args.root}: no <scene>/images/scene_<cam>_final_preview/frame.*.tonemap.jpg found")
    opts = convert.common_opts(args) | {"depth_scale": args.depth_scale, "fov_deg": args.fov_deg}
    return convert.run("hypersim", frames, load, opts, args)


if __name__ == "__main__":
    sys.exit(main())
