"""KITTI converter on the real fixture frames laid out as KITTI raw + annotated depth."""

import re

import cv2
import numpy as np
import pytest

from conftest import read_folder
from data_prep import check, kitti, layouts


@pytest.fixture
def tree(fixtures_dir, tmp_path):
    return layouts.kitti_tree(fixtures_dir, tmp_path / "src")


def test_converts_real_frames_exactly(tree, tmp_path, fixtures_dir, capsys):
    raw_root, depth_root = tree
    out = tmp_path / "out"
    rc = kitti.main(["--raw", str(raw_root), "--depth", str(depth_root), "--out", str(out),
                     "--workers", "1", "--no-progress"])
    assert rc == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    samples = read_folder(out)
    assert sorted(samples) == [f"kitti_{layouts.KITTI_DRIVE}_{i:010d}" for i in (5, 50, 100)]
    maxima = []
    for i in (5, 50, 100):
        d = samples[f"kitti_{layouts.KITTI_DRIVE}_{i:010d}"]
        src_depth = cv2.imread(str(fixtures_dir / "kitti" / f"depth_{i:010d}.png"), cv2.IMREAD_UNCHANGED)
        src_rgb = cv2.cvtColor(cv2.imread(str(fixtures_dir / "kitti" / f"rgb_{i:010d}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(d["depth_raw"], src_depth)  # bit-exact, nothing clipped
        np.testing.assert_array_equal(d["rgb"], src_rgb)
        # the source PNG is stored as it is
        assert d["raw_sample"]["rgb.png"] == (fixtures_dir / "kitti" / f"rgb_{i:010d}.png").read_bytes()
        m = d["meta"]
        assert m["depth_scale"] == 1 / 256 and (m["width"], m["height"]) == (1242, 375)
        assert m["fx"] == pytest.approx(721.5377) and m["fy"] == pytest.approx(721.5377)
        assert m["cx"] == pytest.approx(609.5593) and m["cy"] == pytest.approx(172.854)
        assert m["scene"] == layouts.KITTI_DRIVE and m["frame"] == f"{i:010d}"
        valid = d["depth_raw"] > 0
        np.testing.assert_array_equal(d["depth"][valid], src_depth[valid].astype(np.float32) / 256)
        assert (d["depth"][~valid] == 0).all() and not d["sky"].any()
        maxima.append(d["depth"].max())
    assert max(maxima) == pytest.approx(84.89, abs=0.01)  # values above 80 m are kept
    assert check.main([str(out), "--quiet"]) == 0


def test_split_file_formats(tree, tmp_path):
    raw_root, depth_root = tree
    split = tmp_path / "split.txt"
    split.write_text(
        "# monodepth2 style, then BTS style\n"
        f"{layouts.KITTI_DATE}/{layouts.KITTI_DRIVE} 50 l\n"
        "\n"
        f"{layouts.KITTI_DATE}/{layouts.KITTI_DRIVE}/image_02/data/0000000100.png "
        f"{layouts.KITTI_DRIVE}/proj_depth/groundtruth/image_02/0000000100.png 721.5377\n"
    )
    out = tmp_path / "out"
    rc = kitti.main(["--raw", str(raw_root), "--depth", str(depth_root), "--out", str(out),
                     "--split", str(split), "--workers", "1", "--no-progress", "--rgb-format", "jpg"])
    assert rc == 0
    samples = read_folder(out)
    assert sorted(samples) == [f"kitti_{layouts.KITTI_DRIVE}_{i:010d}" for i in (50, 100)]
    assert all("rgb.jpg" in s["raw_sample"] for s in samples.values())


def test_split_parse_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("this is not a frame\n")
    with pytest.raises(ValueError, match="line 1"):
        kitti.parse_split(bad)
    ok = tmp_path / "ok.txt"
    ok.write_text("2011_09_26/2011_09_26_drive_0002_sync 0000000005 r\n")
    assert kitti.parse_split(ok) == [("2011_09_26_drive_0002_sync", "image_03", 5)]
    # the same frame in both layouts: named with both lines, not as a duplicate key at write time
    twice = tmp_path / "twice.txt"
    twice.write_text("2011_09_26/2011_09_26_drive_0002_sync 0000000005 l\n\n"
                     "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000005.png 0\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(twice))}: line 3: lists the frame of line 1 again$"):
        kitti.parse_split(twice)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(empty))}: lists no frames$"):
        kitti.parse_split(empty)


def test_split_file_not_text_named(tmp_path):
    split = tmp_path / "split.txt"
    split.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match=f"^{re.escape(str(split))}: cannot read \\(.*codec"):
        kitti.parse_split(split)


def _convert_with_calib(tree, tmp_path, capsys, calib_text: str):
    """Convert the tree with its calibration file replaced: (exit code, stderr, calibration path)."""
    raw_root, depth_root = tree
    calib = raw_root / layouts.KITTI_DATE / "calib_cam_to_cam.txt"
    calib.write_text(calib_text)
    out = tmp_path / "out"
    rc = kitti.main(["--raw", str(raw_root), "--depth", str(depth_root), "--out", str(out),
                     "--workers", "1", "--no-progress"])
    assert not list(out.glob("*.tar")) and not (out / "index.json").exists()
    return rc, capsys.readouterr().err.strip(), calib


@pytest.mark.parametrize("fx", [float("nan"), float("inf")])
def test_non_finite_calibration_named(tree, tmp_path, capsys, fx):
    rc, err, calib = _convert_with_calib(tree, tmp_path, capsys, layouts.kitti_calib_text(fx=fx))
    assert rc == 2 and "\n" not in err
    assert err.startswith(f"error: {calib}: P_rect_02: intrinsics must be positive finite numbers (fx={fx}")


def test_missing_calib_line_named(tree, tmp_path, capsys):
    rc, err, calib = _convert_with_calib(tree, tmp_path, capsys, layouts.kitti_calib_text(p_rect_02=False))
    assert rc == 2
    assert err.startswith(f"error: {calib}: no P_rect_02 line (missing intrinsics)") and "\n" not in err


def test_two_workers_same_bytes(tree, tmp_path):
    raw_root, depth_root = tree
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        assert kitti.main(["--raw", str(raw_root), "--depth", str(depth_root), "--out", str(out),
                           "--workers", workers, "--no-progress", "--shard-size", "2"]) == 0
        outs.append(out)
    names = sorted(p.name for p in outs[0].glob("*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar"]
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes()
