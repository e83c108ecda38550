"""Small source trees in each dataset's published layout, for tests and converter demos.

``kitti_tree`` and ``hypersim_tree`` copy the real frames of the shared fixtures folder (never
modified in place) into the dataset's own layout, adding only what the fixtures lack (a KITTI
calibration file with the fixture's focal length and principal point, a Hypersim tonemap JPEG).
``vkitti2_tree`` writes small generated vKITTI2 files (including 65535 and the sky colour).
``png_declaring`` builds a corrupt image for tests of bad input.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

KITTI_DATE = "2011_09_26"
KITTI_DRIVE = "2011_09_26_drive_0001_sync"
KITTI_FRAMES = (5, 50, 100)
KITTI_FX, KITTI_CX, KITTI_CY = 721.5377, 609.5593, 172.854


def kitti_calib_text(fx=KITTI_FX, cx=KITTI_CX, cy=KITTI_CY, p_rect_02: bool = True) -> str:
    """A calib_cam_to_cam.txt in the KITTI raw format (values of the 2011_09_26 calibration)."""
    lines = [
        "calib_time: 09-Jan-2012 13:57:47",
        "corner_dist: 9.950000e-02",
        "S_00: 1.392000e+03 5.120000e+02",
        "P_rect_00: 7.215377e+02 0.000000e+00 6.095593e+02 0.000000e+00 0.000000e+00 7.215377e+02 "
        "1.728540e+02 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00",
        "S_rect_02: 1.242000e+03 3.750000e+02",
    ]
    if p_rect_02:
        lines.append(
            f"P_rect_02: {fx:e} 0.000000e+00 {cx:e} 4.485728e+01 0.000000e+00 {fx:e} {cy:e} "
            "2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03"
        )
    lines.append(
        f"P_rect_03: {fx:e} 0.000000e+00 {cx:e} -3.395242e+02 0.000000e+00 {fx:e} {cy:e} "
        "2.199936e+00 0.000000e+00 0.000000e+00 1.000000e+00 2.729905e-03"
    )
    return "\n".join(lines) + "\n"


def kitti_tree(fixtures: Path, root: Path, frames=KITTI_FRAMES) -> tuple[Path, Path]:
    """RAW and DEPTH trees holding the fixture frames; returns (raw, depth)."""
    fixtures, root = Path(fixtures), Path(root)
    raw, depth = root / "raw", root / "depth"
    img_dir = raw / KITTI_DATE / KITTI_DRIVE / "image_02" / "data"
    gt_dir = depth / "train" / KITTI_DRIVE / "proj_depth" / "groundtruth" / "image_02"
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for i in frames:
        name = f"{i:010d}.png"
        shutil.copyfile(fixtures / "kitti" / f"rgb_{name}", img_dir / name)
        shutil.copyfile(fixtures / "kitti" / f"depth_{name}", gt_dir / name)
    (raw / KITTI_DATE / "calib_cam_to_cam.txt").write_text(kitti_calib_text())
    return raw, depth


HYPERSIM_SCENE = "ai_037_002"
HYPERSIM_CAM = "cam_00"


def hypersim_tree(fixtures: Path, root: Path) -> Path:
    """A Hypersim tree with the fixture depth and a generated tonemap JPEG; returns the root."""
    fixtures, root = Path(fixtures), Path(root)
    images = root / HYPERSIM_SCENE / "images"
    prev = images / f"scene_{HYPERSIM_CAM}_final_preview"
    geo = images / f"scene_{HYPERSIM_CAM}_geometry_hdf5"
    prev.mkdir(parents=True, exist_ok=True)
    geo.mkdir(parents=True, exist_ok=True)
    src = fixtures / "hypersim" / "frame.0000.depth_meters.hdf5"
    shutil.copyfile(src, geo / "frame.0000.depth_meters.hdf5")
    import h5py

    with h5py.File(src, "r") as f:
        h, w = f["dataset"].shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 256)], -1).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    (prev / "frame.0000.tonemap.jpg").write_bytes(buf.tobytes())
    return root


VKITTI2_SKY_RGB = (90, 200, 255)


def vkitti2_tree(root: Path, scenes=("Scene01", "Scene02"), variations=("clone", "fog"),
                 n_frames: int = 3, width: int = 64, height: int = 24, seed: int = 0) -> Path:
    """Generated vKITTI2 files: rgb JPEGs, uint16 cm depth with 65535 under a sky band, class
    segmentation with the sky colour, intrinsic.txt for cameras 0 and 1; returns the root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    sky_rows = height // 4
    for scene in scenes:
        for var in variations:
            base = root / scene / var
            lines = ["frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"]
            for i in range(n_frames):
                for cam in (0, 1):
                    lines.append(f"{i} {cam} {725.0087 + i} {725.0087 + i} {620.5 * width / 1242:.4f} {187.0 * height / 375:.4f}")
                    d = {k: base / "frames" / k / f"Camera_{cam}" for k in ("rgb", "depth", "classSegmentation")}
                    for p in d.values():
                        p.mkdir(parents=True, exist_ok=True)
                    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                    ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 90])
                    (d["rgb"] / f"rgb_{i:05d}.jpg").write_bytes(buf.tobytes())
                    depth = rng.integers(1, 65535, (height, width)).astype(np.uint16)
                    depth[:sky_rows] = 65535
                    depth[-1, :3] = (0, 1, 8000)  # 0 and exact small/80 m values survive too
                    cv2.imwrite(str(d["depth"] / f"depth_{i:05d}.png"), depth)
                    seg = np.zeros((height, width, 3), np.uint8)
                    seg[:] = (100, 60, 100)  # road colour
                    seg[:sky_rows] = VKITTI2_SKY_RGB
                    cv2.imwrite(str(d["classSegmentation"] / f"classgt_{i:05d}.png"), seg[..., ::-1])
            (base / "intrinsic.txt").write_text("\n".join(lines) + "\n")
    return root


def png_declaring(width: int, height: int) -> bytes:
    """A PNG with valid chunk CRCs whose header declares ``width`` x ``height`` 8-bit RGB pixels
    but whose data holds only a few bytes: a corrupt file that OpenCV refuses by raising
    cv2.error (more than CV_IO_MAX_IMAGE_PIXELS), not by returning None."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))
