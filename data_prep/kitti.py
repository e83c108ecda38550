"""KITTI (raw images + annotated depth) -> shards.

``python -m data_prep.kitti --raw RAW --depth DEPTH --out DIR [--split FILE]``

Reads the published layouts::

    RAW/<date>/<date>_drive_XXXX_sync/image_02/data/%010d.png          (image_03: right camera)
    RAW/<date>/calib_cam_to_cam.txt                                     (P_rect_02 / P_rect_03)
    DEPTH/{train,val}/<drive>_sync/proj_depth/groundtruth/image_02/%010d.png

Ground truth is copied raw: uint16, metres = value / 256 (depth_scale 0.00390625), 0 = no
measurement; values above 80 m are kept (the 80 m cap is a training-time policy). KITTI has no
sky labels, so no sky.png is written. rgb is stored as the source PNG unless --rgb-format says
otherwise.

Without --split every ground-truth frame of image_02 under DEPTH/train and DEPTH/val is
converted. --split FILE lists frames, one per line (blank lines and '#' comments ignored), in
either of the two layouts used by common KITTI split files:

    2011_09_26/2011_09_26_drive_0002_sync 0000000005 l      (monodepth2: drive, frame, l|r)
    2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000005.png [more columns ignored]

'l' is image_02 (left colour camera), 'r' is image_03.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path

from . import convert
from .arguments import ArgumentParser
from .convert import Frame, bad
from .schema import SampleError, make_key

SOURCE = "kitti"
DEPTH_SCALE = 1.0 / 256.0
_CAMS = {"l": "image_02", "r": "image_03"}
_DRIVE_RE = re.compile(r"^(\d{4}_\d{2}_\d{2})_drive_\d{4}_sync$")
_PATH_RE = re.compile(r"(?:^|/)(\d{4}_\d{2}_\d{2}_drive_\d{4}_sync)/(image_0[23])/data/(\d+)\.png$")


def read_calib(path: Path, camera: str) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) from P_rect_0N in a KITTI calib_cam_to_cam.txt."""
    path = Path(path)
    if not path.is_file():
        raise bad(path, "missing calibration file")
    name = "P_rect_" + camera[-2:]
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise bad(path, f"cannot read ({e})") from None
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() == name:
            try:
                p = [float(x) for x in v.split()]
            except ValueError:
                raise bad(path, f"{name}: cannot parse numbers") from None
            if len(p) != 12:
                raise bad(path, f"{name}: expected 12 numbers, got {len(p)}")
            fx, cx, fy, cy = p[0], p[2], p[5], p[6]
            # float() parses 'nan' and 'inf', and NaN passes any comparison with 0
            if not all(math.isfinite(v) and v > 0 for v in (fx, fy, cx, cy)):
                raise bad(path, f"{name}: intrinsics must be positive finite numbers "
                                f"(fx={fx} fy={fy} cx={cx} cy={cy})")
            return fx, fy, cx, cy
    raise bad(path, f"no {name} line (missing intrinsics)")


@functools.lru_cache(maxsize=64)
def _calib_cached(path: str, camera: str) -> tuple[float, float, float, float]:
    return read_calib(Path(path), camera)


def parse_split(path: Path) -> list[tuple[str, str, int]]:
    """[(drive, camera dir, frame index)] from a split file (see module docstring)."""
    out, seen = [], {}
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as e:  # its message names a byte, not the file
        raise ValueError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tok = line.split()
        m = _PATH_RE.search(tok[0])
        drive = tok[0].rstrip("/").rsplit("/", 1)[-1]
        if m:
            frame = (m.group(1), m.group(2), int(m.group(3)))
        elif len(tok) >= 2 and _DRIVE_RE.match(drive) and tok[1].isdigit():
            side = tok[2] if len(tok) >= 3 else "l"
            if side not in _CAMS:
                raise ValueError(f"{path}: line {n}: camera must be l or r, got {side!r}")
            frame = (drive, _CAMS[side], int(tok[1]))
        else:
            raise ValueError(f"{path}: line {n}: cannot parse {line!r}")
        if frame in seen:  # the same sample key twice: the writer would stop on it, naming neither
            raise ValueError(f"{path}: line {n}: lists the frame of line {seen[frame]} again")
        seen[frame] = n
        out.append(frame)
    if not out:
        raise ValueError(f"{path}: lists no frames")
    return out


def _make_frame(raw: Path, depth_root: Path, drive: str, cam: str, idx: int, gt: Path | None = None) -> Frame:
    date = drive[:10]
    name = f"{idx:010d}.png"
    if gt is None:
        cands = [depth_root / s / drive / "proj_depth" / "groundtruth" / cam / name for s in ("train", "val")]
        gt = next((c for c in cands if c.exists()), cands[0])
    rgb = raw / date / drive / cam / "data" / name
    return Frame(
        label=str(rgb),
        paths={"rgb": str(rgb), "depth": str(gt), "calib": str(raw / date / "calib_cam_to_cam.txt")},
        params={"drive": drive, "camera": cam, "frame": f"{idx:010d}"},
    )


def find_frames(raw: Path, depth_root: Path, split: Path | None = None) -> list[Frame]:
    if split is not None:
        return [_make_frame(raw, depth_root, d, c, i) for d, c, i in parse_split(split)]
    frames = []
    for sub in ("train", "val"):
        for gt in sorted((depth_root / sub).glob("*_sync/proj_depth/groundtruth/image_02/*.png")):
            drive = gt.parents[3].name
            if not _DRIVE_RE.match(drive) or not gt.stem.isdigit():
                continue
            frames.append(_make_frame(raw, depth_root, drive, "image_02", int(gt.stem), gt))
    return frames


def load(frame: Frame, opts: dict) -> dict:
    p, q = frame.paths, frame.params
    rgb, rgb_bytes, rgb_fmt, depth = convert.read_rgb_and_depth16(p["rgb"], p["depth"])
    fx, fy, cx, cy = _calib_cached(p["calib"], q["camera"])
    frame_id = q["frame"] if q["camera"] == "image_02" else f"{q['frame']}-{q['camera']}"
    h, w = depth.shape
    meta = {"source": SOURCE, "scene": q["drive"], "frame": frame_id, "width": w, "height": h,
            "fx": fx, "fy": fy, "cx": cx, "cy": cy, "depth_scale": DEPTH_SCALE, "camera": q["camera"]}
    return convert.encode_frame(opts, make_key(SOURCE, q["drive"], frame_id), rgb, rgb_bytes, rgb_fmt, depth, meta)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m data_prep.kitti", description="KITTI raw + annotated depth -> shards")
    ap.add_argument("--raw", type=Path, required=True, help="KITTI raw root (holds 2011_09_26/ ...)")
    ap.add_argument("--depth", type=Path, required=True, help="annotated depth root (holds train/ and val/)")
    ap.add_argument("--split", type=Path, default=None, help="file listing the frames to convert")
    convert.add_common_args(ap)
    args = ap.parse_args(argv)
    for flag, d in (("--raw", args.raw), ("--depth", args.depth)):
        if not d.is_dir():
            return convert.fail(f"{d}: not a folder ({flag})")
    if args.split is not None and not args.split.is_file():
        return convert.fail(f"{args.split}: missing split file")
    try:
        frames = find_frames(args.raw, args.depth, args.split)
    except (ValueError, SampleError, OSError) as e:
        return convert.fail(str(e))
    if not frames:
        return convert.fail(f"{args.depth}: no {{train,val}}/*_sync/proj_depth/groundtruth/image_02/*.png found")
    return convert.run("kitti", frames, load, convert.common_opts(args), args)


if __name__ == "__main__":
    sys.exit(main())
