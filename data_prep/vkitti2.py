"""Virtual KITTI 2 -> shards.

``python -m data_prep.vkitti2 --root ROOT --out DIR [--scenes Scene01 ...] [--variations clone ...] [--camera 0]``

Reads the published layout (the rgb, depth, classSegmentation and textgt archives extracted
into one ROOT)::

    ROOT/SceneXX/<variation>/frames/rgb/Camera_N/rgb_%05d.jpg
    ROOT/SceneXX/<variation>/frames/depth/Camera_N/depth_%05d.png              uint16 cm
    ROOT/SceneXX/<variation>/frames/classSegmentation/Camera_N/classgt_%05d.png
    ROOT/SceneXX/<variation>/intrinsic.txt     frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]

Depth is copied raw (depth_scale 0.01 m), 65535 (the renderer's far clip, 655.35 m, covering
the sky) included. The sky class colour (90, 200, 255) becomes sky.png; a frame without a
segmentation file gets no sky.png. rgb is stored as the source JPEG unless --rgb-format says
otherwise.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path

import numpy as np

from . import convert
from .arguments import ArgumentParser
from .convert import Frame, bad
from .schema import make_key

SOURCE = "vkitti2"
DEPTH_SCALE = 0.01
SKY_RGB = (90, 200, 255)
_RGB_RE = re.compile(r"^rgb_(\d+)\.(jpg|png)$")


def read_intrinsics(path: Path) -> dict[tuple[int, int], tuple[float, float, float, float]]:
    """``{(frame, camera): (fx, fy, cx, cy)}`` from a vKITTI2 intrinsic.txt."""
    path = Path(path)
    if not path.is_file():
        raise bad(path, "missing intrinsics file")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise bad(path, f"cannot read ({e})") from None
    rows = [ln.split() for ln in lines if ln.strip()]
    if not rows or rows[0][:2] != ["frame", "cameraID"]:
        raise bad(path, "not a vKITTI2 intrinsic.txt (expected header 'frame cameraID K[0,0] ...')")
    out = {}
    for n, row in enumerate(rows[1:], start=2):
        try:
            frame, cam = int(row[0]), int(row[1])
            fx, fy, cx, cy = (float(v) for v in row[2:6])
        except (ValueError, IndexError):
            raise bad(path, f"line {n}: cannot parse {' '.join(row)!r}") from None
        if not all(math.isfinite(v) and v > 0 for v in (fx, fy, cx, cy)):
            raise bad(path, f"line {n}: intrinsics must be finite and positive, got {' '.join(row[2:6])}")
        out[(frame, cam)] = (fx, fy, cx, cy)
    return out


@functools.lru_cache(maxsize=16)
def _intrinsics_cached(path: str) -> dict:
    return read_intrinsics(Path(path))


def find_frames(root: Path, scenes=None, variations=None, camera: int = 0) -> list[Frame]:
    frames = []
    scene_dirs = sorted(p for p in root.glob("Scene*") if p.is_dir())
    if scenes:
        wanted = set(scenes)
        scene_dirs = [p for p in scene_dirs if p.name in wanted]
    for scene_dir in scene_dirs:
        var_dirs = sorted(p for p in scene_dir.iterdir() if p.is_dir())
        if variations:
            var_dirs = [p for p in var_dirs if p.name in set(variations)]
        for var_dir in var_dirs:
            rgb_dir = var_dir / "frames" / "rgb" / f"Camera_{camera}"
            if not rgb_dir.is_dir():
                continue
            for rgb in sorted(rgb_dir.iterdir()):
                m = _RGB_RE.match(rgb.name)
                if not m:
                    continue
                idx = m.group(1)
                fdir = var_dir / "frames"
                frames.append(
                    Frame(
                        label=str(rgb),
                        paths={
                            "rgb": str(rgb),
                            "depth": str(fdir / "depth" / f"Camera_{camera}" / f"depth_{idx}.png"),
                            "seg": str(fdir / "classSegmentation" / f"Camera_{camera}" / f"classgt_{idx}.png"),
                            "intrinsics": str(var_dir / "intrinsic.txt"),
                        },
                        params={"scene": scene_dir.name, "variation": var_dir.name,
                                "camera": camera, "frame": int(idx), "frame_str": idx},
                    )
                )
    return frames


def load(frame: Frame, opts: dict) -> dict:
    p, q = frame.paths, frame.params
    rgb, rgb_bytes, rgb_fmt, depth = convert.read_rgb_and_depth16(p["rgb"], p["depth"])
    sky = None
    seg_path = Path(p["seg"])
    if seg_path.exists():
        seg = convert.decode_image_bytes(convert.read_bytes(seg_path), seg_path)
        if seg.dtype != np.uint8 or seg.ndim != 3 or seg.shape[2] < 3:
            raise bad(seg_path, f"expected an 8-bit colour segmentation, got {seg.dtype} {seg.shape}")
        convert.check_same_size(rgb, p["rgb"], seg, seg_path)
        r, g, b = SKY_RGB
        sky = (seg[..., 2] == r) & (seg[..., 1] == g) & (seg[..., 0] == b)  # cv2 gives BGR
    intr = _intrinsics_cached(p["intrinsics"])
    k = intr.get((q["frame"], q["camera"]))
    if k is None:
        raise bad(p["intrinsics"], f"no intrinsics for frame {q['frame']} camera {q['camera']}")
    fx, fy, cx, cy = k
    scene = f"{q['scene']}-{q['variation']}"
    frame_id = f"cam{q['camera']}-{q['frame_str']}"
    h, w = depth.shape
    meta = {"source": SOURCE, "scene": scene, "frame": frame_id, "width": w, "height": h,
            "fx": fx, "fy": fy, "cx": cx, "cy": cy, "depth_scale": DEPTH_SCALE,
            "camera": q["camera"]}
    return convert.encode_frame(opts, make_key(SOURCE, scene, frame_id), rgb, rgb_bytes, rgb_fmt, depth, meta,
                                sky=sky)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m data_prep.vkitti2", description="Virtual KITTI 2 -> shards")
    ap.add_argument("--root", type=Path, required=True, help="folder holding Scene01, Scene02, ...")
    ap.add_argument("--scenes", nargs="+", default=None, help="e.g. Scene01 Scene20 (default: all)")
    ap.add_argument("--variations", nargs="+", default=None, help="e.g. clone fog (default: all)")
    ap.add_argument("--camera", type=int, default=0, choices=[0, 1])
    convert.add_common_args(ap)
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        return convert.fail(f"{args.root}: not a folder")
    try:
        frames = find_frames(args.root, args.scenes, args.variations, args.camera)
    except OSError as e:
        return convert.fail(f"{e.filename or args.root}: {e.strerror or e}")
    if not frames:
        return convert.fail(f"{args.root}: no SceneXX/<variation>/frames/rgb/Camera_{args.camera}/rgb_*.jpg found")
    return convert.run("vkitti2", frames, load, convert.common_opts(args), args)


if __name__ == "__main__":
    sys.exit(main())
