"""Hypersim converter on the real fixture depth (distance along the ray -> planar depth)."""

import math
import shutil

import cv2
import h5py
import numpy as np
import pytest

from data_prep import check, hypersim, layouts
from data_prep.schema import decode_sample

DEPTH_REL = f"{layouts.HYPERSIM_SCENE}/images/scene_{layouts.HYPERSIM_CAM}_geometry_hdf5/frame.0000.depth_meters.hdf5"
KEY = f"hypersim_{layouts.HYPERSIM_SCENE}_{layouts.HYPERSIM_CAM}-0000"


def convert(root, out, *extra):
    return hypersim.main(["--root", str(root), "--out", str(out), "--workers", "1", "--no-progress", *extra])


def only_sample(folder):
    problems = []
    samples = [decode_sample(r) for s in sorted(folder.glob("*.tar")) for r in check.read_shard(s, problems)]
    assert problems == [] and len(samples) == 1
    return samples[0]


def test_intrinsics_match_fixture_readme():
    fx, fy, cx, cy = hypersim.intrinsics(1024, 768)
    assert fx == fy == pytest.approx(886.81, abs=0.01)
    assert (cx, cy) == (511.5, 383.5)


def test_planar_conversion_on_real_frame(fixtures_dir, tmp_path):
    root = layouts.hypersim_tree(fixtures_dir, tmp_path / "src")
    out = tmp_path / "out"
    assert convert(root, out) == 0
    d = only_sample(out)
    assert d["key"] == KEY
    with h5py.File(fixtures_dir / "hypersim" / "frame.0000.depth_meters.hdf5", "r") as f:
        dist = f["dataset"][()].astype(np.float64)
    h, w = dist.shape
    m = d["meta"]
    assert (m["width"], m["height"]) == (w, h) and m["depth_scale"] == 0.001
    f = (w / 2) / math.tan(math.radians(30))
    assert m["fx"] == pytest.approx(f) and m["fy"] == pytest.approx(f)
    assert (m["cx"], m["cy"]) == ((w - 1) / 2, (h - 1) / 2)
    z = d["depth_raw"].astype(np.float64) * 0.001

    # next to the principal point the ray is the optical axis: planar == distance
    c = (h // 2, w // 2)
    assert abs(z[c] - dist[c]) <= 0.0005 + 1e-9
    # at a corner the planar depth is the distance times the ray's cosine (about 0.8 here)
    x, y = (0 - m["cx"]), (0 - m["cy"])
    cos = f / math.sqrt(x * x + y * y + f * f)
    assert cos < 0.82
    assert z[0, 0] == pytest.approx(dist[0, 0] * cos, abs=0.0005)
    assert abs(z[0, 0] - dist[0, 0]) > 1.0  # i.e. ray distance really became planar depth
    # every pixel: raw = round(planar / 1 mm)
    yy, xx = np.mgrid[0:h, 0:w]
    planar = dist * f / np.sqrt((xx - m["cx"]) ** 2 + (yy - m["cy"]) ** 2 + f * f)
    np.testing.assert_array_equal(d["depth_raw"], np.rint(planar / 0.001).astype(np.uint16))
    assert d["rgb"].shape == (h, w, 3) and not d["sky"].any()
    assert check.main([str(out), "--quiet"]) == 0


def _rewrite(path, fn):
    with h5py.File(path, "r") as f:
        data = f["dataset"][()]
    data = fn(data.copy())
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=data)


def test_nan_becomes_no_measurement(fixtures_dir, tmp_path):
    root = layouts.hypersim_tree(fixtures_dir, tmp_path / "src")
    p = root / DEPTH_REL

    def add_nan(a):
        a[10:20, 30:40] = np.nan
        return a

    _rewrite(p, add_nan)
    assert convert(root, tmp_path / "out") == 0
    d = only_sample(tmp_path / "out")
    assert (d["depth_raw"][10:20, 30:40] == 0).all() and (d["depth"][10:20, 30:40] == 0).all()
    assert (d["depth_raw"][20:, :] > 0).all()


def test_negative_depth_named(fixtures_dir, tmp_path, capsys):
    root = layouts.hypersim_tree(fixtures_dir, tmp_path / "src")
    p = root / DEPTH_REL

    def neg(a):
        a[0, 0] = -1.0
        return a

    _rewrite(p, neg)
    assert convert(root, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {p}: depth has 1 negative pixels") and "\n" not in err


def test_too_deep_for_scale_named(fixtures_dir, tmp_path, capsys):
    root = layouts.hypersim_tree(fixtures_dir, tmp_path / "src")
    assert convert(root, tmp_path / "out", "--depth-scale", "0.0001") == 2  # max 6.5 m
    assert "does not fit uint16" in capsys.readouterr().err
    assert convert(root, tmp_path / "out2", "--depth-scale", "0.002") == 0
    assert convert(root, tmp_path / "out3", "--depth-scale", "inf") == 2  # refused up front, not per frame
    assert not (tmp_path / "out3").exists()


def test_size_mismatch_named(fixtures_dir, tmp_path, capsys):
    root = layouts.hypersim_tree(fixtures_dir, tmp_path / "src")
    p = root / DEPTH_REL
    _rewrite(p, lambda a: a[:-1])
    assert convert(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: {p}: size 1024x767 does not match rgb" in err


def test_unreadable_hdf5_named(fixtures_dir, tmp_path, capsys):
    root = layouts.hypersim_tree(fixtures_dir, tmp_path / "src")
    p = root / DEPTH_REL
    p.write_bytes(b"not an hdf5 file")
    assert convert(root, tmp_path / "out") == 2
    assert f"error: {p}: unreadable HDF5" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    # an HDF5 file whose 'dataset' is a group, not an array: named, and skippable
    p.unlink()
    with h5py.File(p, "w") as f:
        f.create_group("dataset")
    assert convert(root, tmp_path / "out") == 2
    assert f"error: {p}: no 'dataset' array in the HDF5 file" in capsys.readouterr().err


def test_infinite_distance_is_a_bad_frame(tmp_path, capsys):
    """Hypersim marks rays that hit nothing with NaN only: +-inf is a broken file, not 65535."""
    prev = tmp_path / "src" / "ai_001_001" / "images" / "scene_cam_00_final_preview"
    geo = prev.parent / "scene_cam_00_geometry_hdf5"
    prev.mkdir(parents=True)
    geo.mkdir()
    dist = np.full((4, 8), 2.0, np.float32)
    for i, (r, c, v) in enumerate([(0, 0, np.nan), (1, 2, np.inf), (3, 7, -np.inf)]):
        d = dist.copy()
        d[r, c] = v
        if i == 2:
            d[0, 0] = np.inf
        (prev / f"frame.{i:04d}.tonemap.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((4, 8, 3), np.uint8))[1].tobytes())
        with h5py.File(geo / f"frame.{i:04d}.depth_meters.hdf5", "w") as f:
            f.create_dataset("dataset", data=d)
    bad1, bad2 = (geo / f"frame.{i:04d}.depth_meters.hdf5" for i in (1, 2))
    assert convert(tmp_path / "src", tmp_path / "out", "--order", "source") == 2  # the first bad frame stops it
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad1}: depth has 1 infinite pixels") and "\n" not in err
    assert convert(tmp_path / "src", tmp_path / "out", "--skip-bad") == 0
    stdout = capsys.readouterr().out
    assert "wrote 1 samples" in stdout and "skipped 2 bad frame(s)" in stdout
    assert f"skipped: {bad1}: depth has 1 infinite pixels" in stdout
    assert f"skipped: {bad2}: depth has 2 infinite pixels" in stdout
    assert only_sample(tmp_path / "out")["depth_raw"][0, 0] == 0  # the NaN frame: no measurement


def test_damaged_hdf5_headers_are_bad_frames_not_tracebacks(fixtures_dir, tmp_path, capsys, monkeypatch):
    """h5py reports some damaged files with ValueError (a datatype header it cannot map), not
    OSError; a 'dataset' holding text is no depth array either: each is one line, and skippable."""
    root = layouts.hypersim_tree(fixtures_dir, tmp_path / "src")
    p = root / DEPTH_REL
    real_file = h5py.File

    def damaged(*args, **kwargs):
        raise ValueError("Insufficient precision in available types to represent (15, 10, 5, 0, 10)")

    monkeypatch.setattr(h5py, "File", damaged)
    assert convert(root, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {p}: unreadable HDF5 (Insufficient precision in available types to "
                          "represent (15, 10, 5, 0, 10))") and "\n" not in err
    assert convert(root, tmp_path / "out", "--skip-bad") == 2  # nothing left to write: one line too
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: hypersim: every frame was bad, nothing written") and "\n" not in err
    monkeypatch.setattr(h5py, "File", real_file)
    p.unlink()
    with h5py.File(p, "w") as f:
        f["dataset"] = "hello"
    assert convert(root, tmp_path / "out2") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {p}: expected a 2-D float array, got bytes") and "\n" not in err


def test_an_unreadable_scene_folder_is_one_line(fixtures_dir, tmp_path, capsys, monkeypatch):
    root = layouts.hypersim_tree(fixtures_dir, tmp_path / "src")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(root / layouts.HYPERSIM_SCENE))

    monkeypatch.setattr(hypersim, "find_frames", denied)
    assert convert(root, tmp_path / "out") == 2
    assert capsys.readouterr().err.strip() == f"error: {root / layouts.HYPERSIM_SCENE}: Permission denied"
