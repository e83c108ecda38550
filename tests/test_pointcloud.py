import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from curriculum import pointcloud as pc


# ----------------------------------------------------------------------------- geometry

def test_intrinsics_from_fov():
    fx, fy, cx, cy = pc.intrinsics_from_fov(640, 480, 90.0)
    assert fx == pytest.approx(320.0)
    assert fy == fx
    assert (cx, cy) == (319.5, 239.5)


def test_unproject_centre_and_corner():
    h, w = 5, 7
    fx, fy, cx, cy = 10.0, 20.0, 3.0, 2.0  # (3, 2) is the centre pixel's centre
    depth = np.full((h, w), 4.0)
    depth[0, 0] = 8.0
    pts = pc.unproject(depth, fx, fy, cx, cy)
    assert pts.shape == (h, w, 3) and pts.dtype == np.float32
    np.testing.assert_allclose(pts[2, 3], [0.0, 0.0, 4.0])
    # top-left pixel centre (u, v) = (0, 0): x = (0 - 3) * 8 / 10, y = (0 - 2) * 8 / 20
    np.testing.assert_allclose(pts[0, 0], [-2.4, -0.8, 8.0], rtol=1e-6)
    # bottom-right (u, v) = (6, 4) at z = 4: x = 3 * 4 / 10, y = 2 * 4 / 20
    np.testing.assert_allclose(pts[4, 6], [1.2, 0.4, 4.0], rtol=1e-6)


def test_unproject_fov_centre_pixel_on_axis():
    fx, fy, cx, cy = pc.intrinsics_from_fov(9, 5, 60.0)
    pts = pc.unproject(np.full((5, 9), 3.0), fx, fy, cx, cy)
    np.testing.assert_allclose(pts[2, 4], [0.0, 0.0, 3.0], atol=1e-7)
    # the outer edge of the image (u = -0.5) lies at half the field of view
    x_edge = (-0.5 - cx) * 3.0 / fx
    assert math.degrees(math.atan2(-x_edge, 3.0)) == pytest.approx(30.0)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 12), w=st.integers(1, 12),
    hfov=st.floats(10.0, 150.0),
    z=st.floats(0.1, 700.0),
    data=st.data(),
)
def test_unproject_then_project_gives_pixel(h, w, hfov, z, data):
    v = data.draw(st.integers(0, h - 1))
    u = data.draw(st.integers(0, w - 1))
    k = pc.intrinsics_from_fov(w, h, hfov)
    depth = np.full((h, w), z, dtype=np.float32)
    pts = pc.unproject(depth, *k)
    uv = pc.project(pts[v, u], *k)
    np.testing.assert_allclose(uv, [u, v], atol=1e-3)
    assert pts[v, u, 2] == pytest.approx(z)


# ----------------------------------------------------------------------------- filters

def test_keep_valid_and_within():
    d = np.array([[1.0, 0.0, -1.0], [np.nan, np.inf, 80.0]])
    assert pc.keep_valid(d).tolist() == [[True, False, False], [False, False, True]]
    assert pc.keep_within(d, 80.0).tolist() == [[True, True, True], [False, False, True]]
    assert pc.keep_within(d, 79.9).tolist() == [[True, True, True], [False, False, False]]


def test_keep_not_sky_threshold_and_mask():
    d = np.array([[10.0, 79.0, 80.0, 655.0, np.inf]])
    assert pc.keep_not_sky(d, sky_threshold=80.0).tolist() == [[True, True, False, False, False]]
    mask = np.array([[True, False, False, False, False]])
    assert pc.keep_not_sky(d, sky_mask=mask).tolist() == [[False, True, True, True, True]]
    both = pc.keep_not_sky(d, sky_threshold=80.0, sky_mask=mask)
    assert both.tolist() == [[False, True, False, False, False]]
    assert pc.keep_not_sky(d).all()


def test_load_mask_png(tmp_path):
    arr = np.zeros((4, 6), dtype=np.uint8)
    arr[:2, :] = 255
    arr[3, 5] = 1  # any nonzero is sky
    path = tmp_path / "sky.png"
    Image.fromarray(arr).save(path)
    mask = pc.load_mask(path, (4, 6))
    assert mask.dtype == bool
    assert mask.sum() == 13 and mask[3, 5] and not mask[2, 0]


def test_load_mask_applies_exif_orientation(tmp_path):
    """A mask carrying EXIF Orientation=6 (stored 6x4 WxH) is read upright (4x6), as predict's images are."""
    arr = np.zeros((4, 6), dtype=np.uint8)
    arr[:, 0] = 255  # the stored left column becomes the top row
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sky.png"
    Image.fromarray(arr).save(path, exif=exif.tobytes())
    mask = pc.load_mask(path, (6, 4))
    assert mask[0].all() and mask.sum() == 4


def test_filter_points_refuses_non_finite_intrinsics():
    d, rgb = _scene()
    for k in ((10.0, 10.0, math.nan, 2.0), (10.0, 10.0, 3.0, math.inf), (0.0, 10.0, 3.0, 2.0)):
        with pytest.raises(ValueError, match="intrinsics must be finite"):
            pc.filter_points(d, rgb, k)


def test_load_mask_size_mismatch_names_file(tmp_path):
    path = tmp_path / "sky_small.png"
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(path)
    with pytest.raises(ValueError) as e:
        pc.load_mask(path, (5, 6))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg


def test_load_mask_unreadable_names_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        pc.load_mask(path, (4, 6))
    with pytest.raises(ValueError, match="missing.png"):
        pc.load_mask(tmp_path / "missing.png", (4, 6))


def test_keep_not_edge_step():
    # 10 m on the left three columns, 20 m on the right three: the two columns either side of the
    # step differ by 100 % / 50 % relative, everything else by 0.
    d = np.full((4, 6), 10.0)
    d[:, 3:] = 20.0
    keep = pc.keep_not_edge(d, 0.05)
    expected = np.ones((4, 6), dtype=bool)
    expected[:, 2:4] = False
    assert (keep == expected).all()
    # 8-neighbourhood gives the same columns for a vertical step
    assert (pc.keep_not_edge(d, 0.05, neighbours=8) == expected).all()
    # 50 % is the smallest relative jump (from the far side): a threshold above it keeps the far side
    keep_loose = pc.keep_not_edge(d, 0.6)
    assert keep_loose[:, 3].all() and not keep_loose[:, 2].any()
    assert pc.keep_not_edge(d, 1.0).all()  # |10 - 20| / 10 = 1.0 is not > 1.0


def test_keep_not_edge_across_an_upsampled_jump():
    """An 8 m / 10 m edge resized up 8x (as predict resizes the network's output to a photo's
    size) ramps over 8 pixels, 2.5 % a step: one-pixel neighbours keep the ramp's flying points,
    neighbours 8 pixels apart drop them all, and the flat parts stay."""
    import torch

    from curriculum.layers import upsample_depth

    low = torch.full((1, 4, 6), 8.0)
    low[..., 3:] = 10.0
    high = upsample_depth(low, (32, 48))[0].numpy()
    ramp = (high > 8.0 + 1e-4) & (high < 10.0 - 1e-4)
    assert ramp.sum() > 0 and pc.keep_not_edge(high, 0.05)[ramp].all()  # the old behaviour
    keep = pc.keep_not_edge(high, 0.05, step=8)
    assert not keep[ramp].any()
    assert keep[:, :10].all() and keep[:, -10:].all()
    with pytest.raises(ValueError, match="step must be a whole number"):
        pc.keep_not_edge(high, 0.05, step=0)


def test_keep_not_edge_diagonal_needs_8_neighbours():
    d = np.full((3, 3), 10.0)
    d[0, 0] = 30.0
    k4 = pc.keep_not_edge(d, 0.05, neighbours=4)
    k8 = pc.keep_not_edge(d, 0.05, neighbours=8)
    assert (~k4).sum() == 3  # the corner and its two 4-neighbours
    assert (~k8).sum() == 4 and not k8[1, 1]


def test_keep_not_edge_ignores_invalid_neighbours_and_border():
    d = np.full((3, 4), 5.0)
    d[1, 1] = 0.0  # a hole in the measurement does not make its neighbours edges
    d[0, 3] = np.nan
    assert pc.keep_not_edge(d, 0.01).all()
    assert pc.keep_not_edge(np.array([[5.0]]), 0.01).all()  # single pixel: no neighbours


def test_keep_confident():
    u = np.array([[0.1, 0.2, 0.3, np.nan]])
    assert pc.keep_confident(u, 0.2).tolist() == [[True, True, False, False]]


# ----------------------------------------------------------------------------- filter_points

def _scene():
    """6 x 8 depth: 10 m foreground on the left half, 30 m on the right, sky row on top."""
    d = np.full((6, 8), 10.0)
    d[:, 4:] = 30.0
    d[0, :] = 655.0          # sky, predicted at the model's far range
    d[5, 0] = 0.0            # invalid
    d[5, 1] = np.nan         # invalid
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(8)[None, :]
    rgb[..., 1] = np.arange(6)[:, None]
    rgb[..., 2] = 7
    return d, rgb


def test_filter_points_no_filters_keeps_valid_only():
    d, rgb = _scene()
    k = pc.intrinsics_from_fov(8, 6)
    pts, cols, report = pc.filter_points(d, rgb, k)
    assert report == {"total": 48, "valid": 2, "kept": 46}
    assert pts.shape == (46, 3) and pts.dtype == np.float32
    assert cols.shape == (46, 3) and cols.dtype == np.uint8
    # colours stay attached to their pixels
    full = pc.unproject(d, *k)
    keep = pc.keep_valid(d)
    np.testing.assert_array_equal(pts, full[keep])
    np.testing.assert_array_equal(cols, rgb[keep])


def test_filter_points_combined_counts():
    d, rgb = _scene()
    unc = np.full(d.shape, 0.1)
    unc[3, 0] = 0.9   # unsure foreground pixel, not removed by anything earlier
    unc[0, 0] = 0.9   # sky: counted against sky, not uncertainty
    pts, cols, report = pc.filter_points(
        d, rgb, pc.intrinsics_from_fov(8, 6),
        max_depth=80.0, sky_threshold=600.0, edge_threshold=0.05,
        uncertainty=unc, max_uncertainty=0.5,
    )
    # valid: the 2 invalid pixels. sky: row 0 (8). beyond: nothing beyond 80 m is left.
    # edge: row 1 borders the sky (8) and columns 3, 4 of rows 2..5 border the step (8); the
    # pixels next to the invalid ones are not edges. uncertainty: (3, 0) only.
    assert report == {"total": 48, "valid": 2, "sky": 8, "beyond": 0, "edge": 16,
                      "uncertainty": 1, "kept": 21}
    assert report["kept"] + sum(v for k, v in report.items() if k not in ("total", "kept")) == 48
    assert len(pts) == len(cols) == report["kept"]
    assert list(report) == ["total", "valid", "sky", "beyond", "edge", "uncertainty", "kept"]


def test_filter_points_first_filter_takes_the_count(tmp_path):
    d, rgb = _scene()
    k = pc.intrinsics_from_fov(8, 6)
    # without a sky filter the range cut removes the sky row
    _, _, r = pc.filter_points(d, rgb, k, max_depth=80.0)
    assert r == {"total": 48, "valid": 2, "beyond": 8, "kept": 38}
    # a sky mask from a PNG (path accepted) covering the sky row and one foreground pixel
    sky = np.zeros((6, 8), dtype=np.uint8)
    sky[0, :] = 255
    sky[2, 2] = 255
    path = tmp_path / "sky.png"
    Image.fromarray(sky).save(path)
    _, _, r = pc.filter_points(d, rgb, k, max_depth=80.0, sky_mask=path)
    assert r == {"total": 48, "valid": 2, "sky": 9, "beyond": 0, "kept": 37}
    _, _, r2 = pc.filter_points(d, rgb, k, max_depth=80.0, sky_mask=pc.load_mask(path, (6, 8)))
    assert r2 == r


def test_filter_points_rejects_bad_inputs():
    d, rgb = _scene()
    k = pc.intrinsics_from_fov(8, 6)
    with pytest.raises(ValueError, match="rgb"):
        pc.filter_points(d, rgb[:5], k)
    with pytest.raises(ValueError, match="uint8"):
        pc.filter_points(d, rgb.astype(np.float32), k)
    with pytest.raises(ValueError, match="together"):
        pc.filter_points(d, rgb, k, uncertainty=np.zeros_like(d))


def test_format_filter_report():
    text = pc.format_filter_report({"total": 200, "valid": 10, "sky": 50, "kept": 140})
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["total", "200"]
    assert lines[1].split()[:3] == ["invalid", "depth", "10"]  # what the row removed, not "valid 10"
    assert "sky" in lines[2] and "50" in lines[2] and "25.0%" in lines[2]
    assert "kept" in lines[3] and "70.0%" in lines[3]


# ----------------------------------------------------------------------------- PLY

def _cloud(n=257, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.normal(0, 50, size=(n, 3)).astype(np.float32)
    cols = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    return pts, cols


def test_ply_round_trip(tmp_path):
    pts, cols = _cloud()
    path = tmp_path / "cloud.ply"
    assert pc.write_ply(path, pts, cols) == path
    data = path.read_bytes()
    header = data[:data.index(b"end_header\n")].decode("ascii")
    assert "format binary_little_endian 1.0" in header.splitlines()
    assert "element vertex 257" in header.splitlines()
    assert len(data) == len(header) + len("end_header\n") + 257 * 15
    pts2, cols2 = pc.read_ply(path)
    np.testing.assert_array_equal(pts2, pts)
    np.testing.assert_array_equal(cols2, cols)
    assert pts2.dtype == np.float32 and cols2.dtype == np.uint8
    assert [p.name for p in tmp_path.iterdir()] == ["cloud.ply"]  # no temp files left


def test_ply_empty_cloud(tmp_path):
    path = tmp_path / "empty.ply"
    pc.write_ply(path, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))
    pts, cols = pc.read_ply(path)
    assert pts.shape == (0, 3) and cols.shape == (0, 3)


def test_ply_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    pts, cols = _cloud()
    path = tmp_path / "cloud.ply"

    def half_then_fail(f, vertices):
        f.write(vertices[: len(vertices) // 2].tobytes())
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(pc, "_write_vertices", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        pc.write_ply(path, pts, cols)
    assert list(tmp_path.iterdir()) == []

    # an existing file under the final name survives an interrupted overwrite untouched
    monkeypatch.undo()
    pc.write_ply(path, pts[:3], cols[:3])
    before = path.read_bytes()
    monkeypatch.setattr(pc, "_write_vertices", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        pc.write_ply(path, pts, cols)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cloud.ply"]


def test_read_ply_refuses_ascii(tmp_path):
    path = tmp_path / "ascii.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
        "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n"
        "end_header\n0 0 1 255 0 0\n"
    )
    with pytest.raises(ValueError) as e:
        pc.read_ply(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_read_ply_refuses_truncated_and_other_properties(tmp_path):
    pts, cols = _cloud(10)
    path = tmp_path / "cut.ply"
    pc.write_ply(path, pts, cols)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="cut.ply"):
        pc.read_ply(path)
    other = tmp_path / "normals.ply"
    other.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nproperty float x\n"
                      b"property float y\nproperty float z\nproperty float nx\nend_header\n")
    with pytest.raises(ValueError, match="normals.ply"):
        pc.read_ply(other)
    junk = tmp_path / "junk.ply"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="junk.ply"):
        pc.read_ply(junk)


# ----------------------------------------------------------------------------- plotting

def test_topdown_view_writes_png(tmp_path):
    pts, cols = _cloud(500)
    pts[:, 2] = np.abs(pts[:, 2])
    path = tmp_path / "top.png"
    assert pc.topdown_view(pts, cols, path, max_range=100.0, title="phantoms") == path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_topdown_view_into_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot(1, 1, 1)
    pts, cols = _cloud(50)
    assert pc.topdown_view(pts, None, ax) is ax
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [80.0, 80.0]


def test_project_uses_each_focal_length_on_its_axis():
    uv = pc.project(np.array([1.0, 2.0, 4.0]), 500.0, 250.0, 10.0, 20.0)
    np.testing.assert_allclose(uv, [1.0 * 500 / 4 + 10, 2.0 * 250 / 4 + 20])


def test_keep_not_edge_8_neighbours_uses_all_four_diagonals():
    d = np.full((3, 3), 10.0)
    d[1, 1] = 30.0  # every corner has the outlier as its only bad (diagonal) neighbour
    assert not pc.keep_not_edge(d, 0.05, neighbours=8).any()
    assert pc.keep_not_edge(d, 0.05, neighbours=4)[[0, 0, 2, 2], [0, 2, 0, 2]].all()


def test_load_mask_ignores_alpha(tmp_path):
    arr = np.zeros((4, 6, 4), dtype=np.uint8)
    arr[..., 3] = 255  # opaque everywhere, colour only in the top row
    arr[0, :, 0] = 255
    path = tmp_path / "sky.png"
    Image.fromarray(arr, "RGBA").save(path)
    mask = pc.load_mask(path, (4, 6))
    assert mask[0].all() and mask.sum() == 6


def test_filter_points_rgba_keeps_the_colour_channels():
    d = np.full((2, 3), 5.0)
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 255
    _, cols, _ = pc.filter_points(d, rgba, (1.0, 1.0, 1.0, 0.5))
    assert (cols == [10, 20, 30]).all()


def test_read_ply_refuses_trailing_bytes_and_accepts_comments(tmp_path):
    pts = np.arange(6, dtype=np.float32).reshape(2, 3)
    cols = np.arange(6, dtype=np.uint8).reshape(2, 3)
    path = tmp_path / "long.ply"
    pc.write_ply(path, pts, cols)
    data = path.read_bytes()
    path.write_bytes(data + b"\x00" * 15)
    with pytest.raises(ValueError, match="long.ply"):
        pc.read_ply(path)
    commented = tmp_path / "commented.ply"
    commented.write_bytes(data.replace(b"1.0\n", b"1.0\ncomment made elsewhere\n", 1))
    pts2, cols2 = pc.read_ply(commented)
    np.testing.assert_array_equal(pts2, pts)
    np.testing.assert_array_equal(cols2, cols)


def test_topdown_view_counts_points_strictly_beyond_max_range():
    from matplotlib.figure import Figure

    ax = Figure().add_subplot(1, 1, 1)
    pc.topdown_view(np.array([[0.0, 0.0, 100.0], [0.0, 0.0, 100.5]]), None, ax, max_range=100.0)
    assert "1 points beyond 100 m" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_bad_fov_and_step_are_refused():
    with pytest.raises(ValueError, match="hfov_deg"):
        pc.intrinsics_from_fov(640, 480, 180.0)
    with pytest.raises(ValueError, match="step"):
        pc.keep_not_edge(np.ones((3, 3)), 0.05, step=True)


def test_write_ply_body_is_little_endian(tmp_path):
    path = tmp_path / "one.ply"
    pc.write_ply(path, np.array([[1.5, -2.0, 3.25]], dtype=np.float32), np.array([[1, 2, 3]], dtype=np.uint8))
    data = path.read_bytes()
    body = data[data.index(b"end_header\n") + len(b"end_header\n"):]
    assert len(body) == 15
    np.testing.assert_array_equal(np.frombuffer(body[:12], "<f4"), [1.5, -2.0, 3.25])
    assert body[12:15] == b"\x01\x02\x03"


def test_load_mask_greyscale_alpha_ignores_alpha(tmp_path):
    la = np.zeros((4, 6, 2), dtype=np.uint8)
    la[..., 1] = 255      # alpha: opaque everywhere
    la[0, :, 0] = 255     # grey: sky only in the top row
    path = tmp_path / "sky_la.png"
    Image.fromarray(la, mode="LA").save(path)
    with Image.open(path) as img:
        assert img.mode == "LA"
    mask = pc.load_mask(path, (4, 6))
    assert mask.sum() == 6 and mask[0].all()


def test_format_filter_report_kept_row_says_kept():
    text = pc.format_filter_report({"total": 200, "valid": 10, "sky": 50, "kept": 140})
    lines = text.splitlines()
    assert lines[3].startswith("kept") and lines[3].endswith("70.0% kept)")
    assert lines[2].endswith("25.0% removed)")


def test_filter_points_refuses_non_positive_fy():
    d, rgb = _scene()
    for k in ((1.0, 0.0, 1.0, 0.5), (1.0, -2.0, 1.0, 0.5)):
        with pytest.raises(ValueError, match="intrinsics must be finite"):
            pc.filter_points(d, rgb, k)


def test_read_ply_refuses_big_endian(tmp_path):
    pts, cols = _cloud(n=3)
    path = tmp_path / "cloud.ply"
    pc.write_ply(path, pts, cols)
    big = tmp_path / "big.ply"
    big.write_bytes(path.read_bytes().replace(b"format binary_little_endian 1.0",
                                              b"format binary_big_endian 1.0", 1))
    with pytest.raises(ValueError, match="binary_big_endian") as e:
        pc.read_ply(big)
    assert str(big) in str(e.value) and "\n" not in str(e.value)


def test_filter_points_and_write_ply_refuse_mismatched_inputs(tmp_path):
    d = np.full((2, 3), 10.0)
    k = (1.0, 1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="sky mask shape"):
        pc.filter_points(d, None, k, sky_mask=np.zeros((1, 3), dtype=bool))
    with pytest.raises(ValueError, match="uncertainty shape"):
        pc.filter_points(d, None, k, uncertainty=np.zeros((1, 3)), max_uncertainty=0.5)
    with pytest.raises(ValueError, match="together"):
        pc.filter_points(d, None, k, max_uncertainty=0.5)
    with pytest.raises(ValueError, match="uint8"):
        pc.write_ply(tmp_path / "f.ply", np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    assert not (tmp_path / "f.ply").exists()


def test_load_mask_reads_a_palette_png_by_colour_not_index(tmp_path):
    """An indexed PNG (labelling tools, GIMP) with white sky at palette index 0: the sky is what is
    white, not what has a nonzero index."""
    idx = np.ones((4, 6), np.uint8)
    idx[:2] = 0
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    img.save(tmp_path / "pmask.png")
    mask = pc.load_mask(tmp_path / "pmask.png", (4, 6))
    assert mask[:2].all() and not mask[2:].any()


def test_an_image_past_the_readers_pixel_limit_is_one_line(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from curriculum.predict import PredictError, read_image
    from curriculum.viz import is_depth_png

    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(path)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)  # 2000 pixels > twice the limit
    with pytest.raises(PredictError) as e:
        read_image(path)
    assert str(e.value) == (f"cannot read image {path}: more than 1000 pixels, the most the image reader opens; "
                            "downscale it")
    with pytest.raises(ValueError, match="cannot read mask .*huge.png"):
        pc.load_mask(path, (40, 50))
    assert not is_depth_png(path)


def test_a_jpeg_mask_is_read_from_half_range_so_its_ringing_is_not_sky(tmp_path):
    """JPEG compression leaves small nonzero values around a white sky's edge (and in blocks of
    the black ground): read as nonzero, they spread the sky over the ground."""
    arr = np.zeros((32, 48), np.uint8)
    arr[:12] = 255
    arr[12:, 20:28] = 255  # a pole up into the sky
    path = tmp_path / "sky.jpg"
    Image.fromarray(arr).save(path, quality=30)
    assert (np.asarray(Image.open(path)) > 0).sum() > (arr > 0).sum() + 20  # the ringing this is about
    mask = pc.load_mask(path, (32, 48))
    assert (mask != (arr > 0)).sum() <= 0.02 * arr.size
    Image.fromarray(np.stack([arr] * 3, axis=2)).save(tmp_path / "rgb.jpg", quality=30)
    assert (pc.load_mask(tmp_path / "rgb.jpg", (32, 48)) != (arr > 0)).sum() <= 0.02 * arr.size


def test_a_multi_picture_jpeg_mask_is_read_as_a_jpeg(tmp_path):
    """Phone cameras write JPEGs with a second picture (MPO), which Pillow reports as MPO."""
    arr = np.zeros((32, 48), np.uint8)
    arr[:12] = 255
    arr[12:, 20:28] = 255
    img = Image.fromarray(np.stack([arr] * 3, axis=2))
    img.save(tmp_path / "mask.mpo", format="MPO", save_all=True, append_images=[img], quality=30)
    with Image.open(tmp_path / "mask.mpo") as check:
        assert check.format == "MPO"
    assert (pc.load_mask(tmp_path / "mask.mpo", (32, 48)) != (arr > 0)).sum() <= 0.02 * arr.size
