import numpy as np
import pytest
from PIL import Image

from curriculum import viz

GREY = [128, 128, 128]


def test_colorize_depth_fixed_range_across_images():
    a = np.array([[1.0, 10.0, 80.0, 655.0]])
    b = np.array([[80.0, 300.0], [2.0, 3.0]])  # different content, different own range
    ca = viz.colorize_depth(a, 1.0, 655.0)
    cb = viz.colorize_depth(b, 1.0, 655.0)
    assert ca.dtype == np.uint8 and ca.shape == (1, 4, 3) and cb.shape == (2, 2, 3)
    assert (ca[0, 2] == cb[0, 0]).all()  # 80 m has one colour whatever else is in the image
    # bottom and top of the range are the colour map's ends and differ from each other
    assert not (ca[0, 0] == ca[0, 3]).all()


def test_colorize_depth_invalid_grey_and_clipping():
    d = np.array([[np.inf, np.nan, 0.0, -3.0, 5.0, 655.0, 10_000.0, 0.1]])
    invalid = np.zeros_like(d, dtype=bool)
    invalid[0, 4] = True
    c = viz.colorize_depth(d, 1.0, 655.0, invalid=invalid)
    for i in range(5):
        assert c[0, i].tolist() == GREY
    assert (c[0, 6] == c[0, 5]).all()  # beyond vmax -> top colour
    assert (c[0, 7] == viz.colorize_depth(np.array([[1.0]]), 1.0, 655.0)[0, 0]).all()


def test_colorize_depth_log_vs_linear():
    d = np.array([[25.6]])  # geometric middle of 1..655 is ~25.6 m
    top = viz.colorize_depth(np.array([[655.0]]), 1.0, 655.0)
    mid_log = viz.colorize_depth(d, 1.0, 655.0)
    mid_lin = viz.colorize_depth(d, 1.0, 655.0, log_scale=False)
    assert not (mid_log == mid_lin).all()
    assert not (mid_log == top).all()
    with pytest.raises(ValueError):
        viz.colorize_depth(d, 0.0, 655.0)  # log scale needs vmin > 0
    with pytest.raises(ValueError):
        viz.colorize_depth(d, 10.0, 1.0)


def test_colorize_error():
    e = np.array([[0.0, 0.25, 0.5, 3.0, np.nan, -1.0]])
    c = viz.colorize_error(e, vmax=0.5)
    assert c.shape == (1, 6, 3) and c.dtype == np.uint8
    assert (c[0, 2] == c[0, 3]).all()  # clipped
    assert not (c[0, 0] == c[0, 2]).all()
    assert c[0, 4].tolist() == GREY and c[0, 5].tolist() == GREY
    masked = viz.colorize_error(e, invalid=np.array([[True, False, False, False, False, False]]))
    assert masked[0, 0].tolist() == GREY


def test_depth_panel_shape_and_special_values():
    h, w = 6, 5
    rgb = np.full((h, w, 3), 200, dtype=np.uint8)
    gt = np.full((h, w), 20.0)
    gt[0, 0] = 0.0       # no measurement
    gt[0, 1] = np.inf    # beyond range / sky
    pred = np.full((h, w), 22.0)
    panel = viz.depth_panel(rgb, gt, pred, vmin=1.0, vmax=655.0)
    assert panel.shape == (h, 4 * w, 3) and panel.dtype == np.uint8
    assert (panel[:, :w] == rgb).all()
    gt_img, pred_img, err_img = panel[:, w:2 * w], panel[:, 2 * w:3 * w], panel[:, 3 * w:]
    top = viz.colorize_depth(np.array([[655.0]]), 1.0, 655.0)[0, 0]
    assert gt_img[0, 0].tolist() == GREY
    assert (gt_img[0, 1] == top).all()
    assert (pred_img == viz.colorize_depth(pred, 1.0, 655.0)).all()
    # error: 0.1 everywhere gt is a measurement, grey at the 0 and inf pixels
    assert err_img[0, 0].tolist() == GREY and err_img[0, 1].tolist() == GREY
    assert (err_img[3, 3] == viz.colorize_error(np.array([[0.1]]))[0, 0]).all()
    # the valid mask greys the error where it is False
    valid = np.ones((h, w), dtype=bool)
    valid[2, 2] = False
    panel2 = viz.depth_panel(rgb, gt, pred, vmin=1.0, vmax=655.0, valid=valid)
    assert panel2[2, 3 * w + 2].tolist() == GREY


def test_depth_panel_resizes_rgb_and_checks_shapes():
    rgb = np.zeros((12, 10, 3), dtype=np.uint8)
    gt = np.ones((6, 5))
    panel = viz.depth_panel(rgb, gt, gt, vmin=1.0, vmax=80.0)
    assert panel.shape == (6, 20, 3)
    with pytest.raises(ValueError, match="pred"):
        viz.depth_panel(rgb, gt, np.ones((6, 4)), vmin=1.0, vmax=80.0)


def test_save_depth_png_has_colour_bar(tmp_path):
    depth = np.geomspace(1.0, 655.0, 60 * 80).reshape(60, 80)
    depth[0, 0] = np.inf
    path = tmp_path / "depth.png"
    assert viz.save_depth_png(depth, path, 1.0, 655.0, title="pred") == path
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
    # the figure is the (enlarged) map plus a labelled colour bar beside it
    assert w > h and w > 80
    assert [p.name for p in tmp_path.iterdir()] == ["depth.png"]


def test_depth_ticks_include_80():
    ticks = viz._depth_ticks(1.0, 655.0)
    assert 80.0 in ticks and 50.0 not in ticks and 100.0 not in ticks
    assert ticks == sorted(ticks) and ticks[0] == 1.0 and ticks[-1] == 500.0


def test_bar_chart_with_nan(tmp_path):
    path = tmp_path / "bins.png"
    viz.bar_chart(
        ["[0,20)", "[20,40)", "[40,80]", ">80", "sky"],
        {"baseline": [0.05, 0.08, 0.12, float("nan"), float("nan")],
         "curriculum": [0.06, 0.08, 0.10, 0.30, 0.40]},
        path, ylabel="abs_rel", title="abs_rel per depth bin",
    )
    with Image.open(path) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="baseline"):
        viz.bar_chart(["a", "b"], {"baseline": [1.0]}, tmp_path / "bad.png", "y", "t")
    assert not (tmp_path / "bad.png").exists()


def test_side_by_side(tmp_path):
    imgs = [np.zeros((20, 30, 3), np.uint8), np.full((20, 30, 3), 255, np.uint8), np.ones((10, 15))]
    path = tmp_path / "examples.png"
    viz.side_by_side(imgs, ["rgb", "baseline", "curriculum"], path, title="examples")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]
    grid = tmp_path / "grid.png"
    viz.side_by_side(imgs * 2, [str(i) for i in range(6)], grid, ncols=3)
    with Image.open(grid) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="labels"):
        viz.side_by_side(imgs, ["one"], tmp_path / "x.png")


def test_save_image_round_trip(tmp_path):
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    path = viz.save_image(img, tmp_path / "c.png")
    assert (np.asarray(Image.open(path)) == img).all()


def test_no_pyplot_figures_left_open():
    # plotting goes through Figure objects only, so nothing accumulates in pyplot's registry
    import sys

    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


def _capture_figures(monkeypatch):
    figs = []

    def fake_save(fig, path, dpi=None):
        figs.append(fig)
        return path

    monkeypatch.setattr(viz, "save_figure", fake_save)
    return figs


def test_side_by_side_depth_bar_adds_colour_bar(tmp_path, monkeypatch):
    figs = _capture_figures(monkeypatch)
    imgs = [np.zeros((10, 20, 3), np.uint8)] * 4
    viz.side_by_side(imgs, list("abcd"), tmp_path / "x.png", ncols=4, depth_bar=(1.0, 80.0))
    (fig,) = figs
    assert len(fig.axes) == 5
    assert sum("depth" in ax.get_ylabel() for ax in fig.axes) == 1
    figs.clear()
    viz.side_by_side(imgs, list("abcd"), tmp_path / "y.png", ncols=4)
    assert len(figs[0].axes) == 4


def test_colorize_error_zero_is_lowest_colour_not_grey():
    c = viz.colorize_error(np.array([[0.0]]), vmax=0.5, cmap="magma")
    assert c[0, 0].tolist() == viz._lut("magma")[0].tolist()
    assert c[0, 0].tolist() != GREY


def test_depth_panel_non_positive_prediction_has_no_error():
    h, w = 2, 3
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    gt = np.full((h, w), 20.0)
    pred = np.full((h, w), 20.0)
    pred[0, 0] = 0.0
    pred[1, 1] = -5.0
    panel = viz.depth_panel(rgb, gt, pred, vmin=1.0, vmax=80.0)
    err_img = panel[:, 3 * w:]
    assert err_img[0, 0].tolist() == GREY and err_img[1, 1].tolist() == GREY
    assert err_img[0, 1].tolist() != GREY  # exact prediction: error 0, the lowest colour


def test_side_by_side_default_columns_keep_every_image(tmp_path, monkeypatch):
    figs = _capture_figures(monkeypatch)
    imgs = [np.full((10, 20, 3), i * 40, np.uint8) for i in range(5)]
    labels = [f"img{i}" for i in range(5)]
    viz.side_by_side(imgs, labels, tmp_path / "x.png")
    (fig,) = figs
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 5
    assert [ax.get_title() for ax in shown] == labels


def test_save_figure_and_image_follow_the_suffix(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), dpi=50)
    fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1])
    pdf = viz.save_figure(fig, tmp_path / "a.pdf")
    assert pdf.read_bytes().startswith(b"%PDF-")
    jpg = viz.save_image(np.full((4, 5, 3), 100, np.uint8), tmp_path / "a.jpg")
    assert jpg.read_bytes().startswith(b"\xff\xd8\xff")


def test_bar_chart_marks_nan_with_n_a(tmp_path, monkeypatch):
    figs = _capture_figures(monkeypatch)
    viz.bar_chart(["a", "b", "c"], {"s": [0.1, float("nan"), None]}, tmp_path / "b.png", "y", "t")
    (fig,) = figs
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["n/a", "n/a"]
    assert len(ax.patches) == 1  # only the finite value has a bar


def test_depth_pngs_are_marked_and_other_images_are_not(tmp_path):
    """predict tells its earlier outputs from photos by the PNG's Software text."""
    from PIL import Image

    from curriculum.viz import is_depth_png, save_depth_png

    depth = np.linspace(1.0, 90.0, 12 * 20, dtype=np.float32).reshape(12, 20)
    assert is_depth_png(save_depth_png(depth, tmp_path / "d_depth.png", 1.0, 80.0))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert not is_depth_png(tmp_path / "photo.png") and not is_depth_png(tmp_path / "broken.png")
