"""Virtual KITTI 2 converter on small generated files in the vKITTI2 layout."""

import cv2
import numpy as np
import pytest

from conftest import read_folder
from data_prep import check, layouts, vkitti2


def convert(root, out, *extra):
    return vkitti2.main(["--root", str(root), "--out", str(out), "--workers", "1", "--no-progress", *extra])


def test_converts_exactly_with_far_clip_and_sky(tmp_path):
    root = layouts.vkitti2_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert convert(root, out) == 0
    samples = read_folder(out)
    assert len(samples) == 2 * 2 * 3  # scenes x variations x frames, camera 0
    d = samples["vkitti2_Scene01-clone_cam0-00001"]
    frames = root / "Scene01" / "clone" / "frames"
    src_depth = cv2.imread(str(frames / "depth" / "Camera_0" / "depth_00001.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(d["depth_raw"], src_depth)
    assert (d["depth_raw"][:6] == 65535).all() and np.isposinf(d["depth"][:6]).all()
    assert d["depth_raw"][-1, 0] == 0 and d["depth"][-1, 2] == pytest.approx(80.0)
    # sky.png from the class colour (90, 200, 255)
    assert d["sky"][:6].all() and not d["sky"][6:].any()
    # intrinsics of frame 1, camera 0
    m = d["meta"]
    assert m["fx"] == pytest.approx(726.0087) and m["depth_scale"] == 0.01
    assert m["scene"] == "Scene01-clone" and m["frame"] == "cam0-00001"
    # the source JPEG is stored unchanged
    assert d["raw_sample"]["rgb.jpg"] == (frames / "rgb" / "Camera_0" / "rgb_00001.jpg").read_bytes()
    assert check.main([str(out), "--quiet"]) == 0


def test_filters_and_camera(tmp_path):
    root = layouts.vkitti2_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert convert(root, out, "--scenes", "Scene02", "--variations", "fog", "--camera", "1") == 0
    samples = read_folder(out)
    assert sorted(samples) == [f"vkitti2_Scene02-fog_cam1-{i:05d}" for i in range(3)]


def test_intrinsics_parser(tmp_path):
    p = tmp_path / "intrinsic.txt"
    p.write_text("frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]\n0 0 725.0087 725.0087 620.5 187\n"
                 "0 1 725.0087 725.0087 620.5 187\n")
    assert vkitti2.read_intrinsics(p) == {(0, 0): (725.0087, 725.0087, 620.5, 187.0),
                                          (0, 1): (725.0087, 725.0087, 620.5, 187.0)}
    p.write_text("something else\n")
    with pytest.raises(ValueError, match="not a vKITTI2 intrinsic.txt"):
        vkitti2.read_intrinsics(p)


def test_no_segmentation_means_no_sky(tmp_path):
    root = layouts.vkitti2_tree(tmp_path / "src", scenes=("Scene01",), variations=("clone",), n_frames=1)
    (root / "Scene01/clone/frames/classSegmentation/Camera_0/classgt_00000.png").unlink()
    out = tmp_path / "out"
    assert convert(root, out) == 0
    (d,) = read_folder(out).values()
    assert "sky.png" not in d["raw_sample"] and not d["sky"].any()


def test_jpeg_quality_reencodes_a_jpeg_source_and_is_checked(tmp_path, capsys):
    """--jpeg-quality is the quality of the JPEGs written: given, the source JPEG is re-encoded
    (it used to pass through unchanged whatever the flag said); out of range or without
    --rgb-format jpg, one line and nothing written."""
    root = layouts.vkitti2_tree(tmp_path / "src")
    src = root / "Scene01" / "clone" / "frames" / "rgb" / "Camera_0" / "rgb_00001.jpg"
    key = "vkitti2_Scene01-clone_cam0-00001"
    assert convert(root, tmp_path / "same", "--rgb-format", "jpg") == 0
    assert read_folder(tmp_path / "same")[key]["raw_sample"]["rgb.jpg"] == src.read_bytes()
    assert convert(root, tmp_path / "q20", "--rgb-format", "jpg", "--jpeg-quality", "20") == 0
    stored = read_folder(tmp_path / "q20")[key]["raw_sample"]["rgb.jpg"]
    rgb = cv2.imread(str(src))
    assert stored == cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 20])[1].tobytes()
    capsys.readouterr()
    for flags, needle in ((["--rgb-format", "jpg", "--jpeg-quality", "-3"], "--jpeg-quality must lie in 1..100, got -3"),
                          (["--rgb-format", "jpg", "--jpeg-quality", "500"], "got 500"),
                          (["--jpeg-quality", "80"], "add --rgb-format jpg (--rgb-format is source)")):
        assert convert(root, tmp_path / "bad", *flags) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
        assert not (tmp_path / "bad").exists()


def test_frames_are_written_shuffled_by_default_and_in_source_order_on_request(tmp_path):
    """A training reader reads a shard whole through a buffer of a few hundred samples: written
    scene by scene, every batch would come from one stretch of one scene. The default order is a
    fixed shuffle (the same data set on every run); --order source keeps the dataset's order."""
    import tarfile

    root = layouts.vkitti2_tree(tmp_path / "src")

    def keys(out):
        names = []
        for shard in sorted(out.glob("*.tar")):
            with tarfile.open(shard) as tar:
                names += [m.name.split(".")[0] for m in tar if m.name.endswith("meta.json")]
        return names

    assert convert(root, tmp_path / "a", "--shard-size", "5") == 0
    assert convert(root, tmp_path / "b", "--shard-size", "5") == 0
    assert convert(root, tmp_path / "c", "--shard-size", "5", "--order", "source") == 0
    shuffled, again, source = keys(tmp_path / "a"), keys(tmp_path / "b"), keys(tmp_path / "c")
    assert source == sorted(source) and len(source) == 12
    assert shuffled == again and sorted(shuffled) == source and shuffled != source
    # --limit takes the first frames of the dataset's order, then shuffles those
    assert convert(root, tmp_path / "d", "--limit", "4") == 0
    assert sorted(keys(tmp_path / "d")) == source[:4]
