"""`curriculum predict` (sizes, colour PNG, npy, PLY, every point-cloud filter, official checkpoints,
bad inputs) and `curriculum eval` against hand-computed numbers."""
import json
import math
import os
import re
import tarfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import write_tiny_shards
from curriculum.checkpoint import load_model, taught_far_target
from curriculum.cli import main as cli_main
from curriculum.config import RECIPES_DIR, load_recipe
from curriculum.data import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from curriculum.model import DepthModel, official_state_dict
from curriculum.pointcloud import keep_not_edge, read_ply
from curriculum.predict import edge_step, network_size


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real checkpoint of this project (tiny model with an uncertainty head, 2 training steps)."""
    from curriculum.train import train

    root = tmp_path_factory.mktemp("predict")
    write_tiny_shards(root / "train", n_shards=2, per_shard=4, seed=0)
    write_tiny_shards(root / "val", n_shards=1, per_shard=2, seed=1)
    cfg = load_recipe([RECIPES_DIR / "smoke.yaml"], [
        f"data.train_shards={root}/train/*.tar", f"data.val_shards={root}/val/*.tar", f"run.out_dir={root}/run",
        "stages.0.steps=1", "stages.1.steps=1", "model.uncertainty=true"])
    return Path(train(cfg)["checkpoint"])


@pytest.fixture
def images(tmp_path):
    """Two images of different aspect ratios (landscape and portrait)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a_wide.png": (60, 130), "b_tall.jpg": (90, 50)}
    for name, (h, w) in sizes.items():
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[: h // 3] = (135, 200, 250)
        Image.fromarray(img).save(folder / name)
    return folder, sizes


def _kept(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"^kept\s+(\d+)", text, flags=re.M)]


def _removed(text: str, name: str) -> list[int]:
    return [int(v) for v in re.findall(rf"^{name}\s+(\d+)", text, flags=re.M)]


def _predict(args, capsys) -> tuple[int, str, str]:
    rc = cli_main(["predict", *[str(a) for a in args]])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_outputs_keep_the_input_size_and_match_the_model(trained, images, tmp_path, capsys):
    folder, sizes = images
    out = tmp_path / "out"
    rc, text, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out, "--save-npy"], capsys)
    assert rc == 0, err
    model, meta = load_model(trained)
    short = min(meta["recipe"]["data"]["val_height"], meta["recipe"]["data"]["val_width"])
    for name, (h, w) in sizes.items():
        stem = Path(name).stem
        depth = np.load(out / f"{stem}_depth.npy")
        unc = np.load(out / f"{stem}_uncertainty.npy")
        assert depth.shape == (h, w) and unc.shape == (h, w) and depth.dtype == np.float32
        # the model's own output at the aspect-kept network size, resized back
        nh, nw = network_size(h, w, short)
        assert nh % 14 == 0 and nw % 14 == 0 and min(nh, nw) == short
        assert abs(nw / nh - w / h) < 0.25 * w / h
        rgb = np.asarray(Image.open(folder / name).convert("RGB"))
        x = torch.from_numpy(cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_CUBIC)).permute(2, 0, 1)[None]
        with torch.no_grad():
            pred = model(normalize_images(x)).depth
        expected = F.interpolate(pred[:, None], size=(h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
        np.testing.assert_allclose(depth, expected, rtol=1e-5, atol=1e-5)
        # colour PNG: the image (enlarged to be readable) plus a colour bar to its right
        png = Image.open(out / f"{stem}_depth.png")
        png.load()
        scale = max(1.0, 400.0 / max(h, w))
        assert png.width > w * scale + 40 and png.width / png.height > w / h
        assert f"network {nw}x{nh}" in text
    assert not list(out.glob("*.ply"))  # no point cloud unless asked


def test_pointcloud_ply_holds_exactly_the_kept_points(trained, images, tmp_path, capsys):
    folder, sizes = images
    out = tmp_path / "pc"
    rc, text, err = _predict(["--checkpoint", trained, "--input", folder / "a_wide.png", "--out", out,
                              "--pointcloud", "--save-npy"], capsys)
    assert rc == 0, err
    h, w = sizes["a_wide.png"]
    points, colours = read_ply(out / "a_wide.ply")
    assert _kept(text) == [h * w] == [len(points)]
    rgb = np.asarray(Image.open(folder / "a_wide.png").convert("RGB"))
    assert np.array_equal(colours, rgb.reshape(-1, 3))
    depth = np.load(out / "a_wide_depth.npy")
    np.testing.assert_allclose(points[:, 2], depth.reshape(-1), rtol=1e-6)
    # default field of view 60 degrees: fx = (w / 2) / tan(30 deg), centre pixel on the axis
    fx = (w / 2) / math.tan(math.radians(30))
    u = np.tile(np.arange(w), h)
    np.testing.assert_allclose(points[:, 0], (u - (w - 1) / 2) * depth.reshape(-1) / fx, rtol=1e-4, atol=1e-4)


def _depth_and_unc(trained, image, tmp_path, capsys):
    out = tmp_path / "ref"
    rc, _, err = _predict(["--checkpoint", trained, "--input", image, "--out", out, "--save-npy"], capsys)
    assert rc == 0, err
    return np.load(out / f"{image.stem}_depth.npy"), np.load(out / f"{image.stem}_uncertainty.npy")


def test_each_filter_removes_what_it_says(trained, images, tmp_path, capsys):
    folder, sizes = images
    image = folder / "a_wide.png"
    h, w = sizes["a_wide.png"]
    depth, unc = _depth_and_unc(trained, image, tmp_path, capsys)
    total = h * w

    def run(*flags):
        out = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        rc, text, err = _predict(["--checkpoint", trained, "--input", image, "--out", out, "--pointcloud", *flags],
                                 capsys)
        assert rc == 0, err
        n = len(read_ply(out / "a_wide.ply")[0])
        assert _kept(text) == [n]
        return text, n

    # drop beyond a depth
    cut = float(np.median(depth))
    text, n = run("--drop-beyond", cut)
    assert _removed(text, "beyond") == [int((depth > cut).sum())] and n == int((depth <= cut).sum())
    text, n = run("--drop-beyond", 0.01)  # below the model's minimum depth: nothing is left
    assert n == 0 and _removed(text, "beyond") == [total]
    # sky predicted beyond a depth
    text, n = run("--drop-sky", "--sky-depth", cut)
    assert _removed(text, "sky") == [int((depth >= cut).sum())] and n == int((depth < cut).sum())
    assert f"sky = predicted >= {cut:g} m" in text
    # sky from a mask file: exactly its pixels
    mask = np.zeros((h, w), np.uint8)
    mask[5:17, 10:40] = 255
    Image.fromarray(mask).save(tmp_path / "sky.png")
    text, n = run("--sky-mask", tmp_path / "sky.png")
    assert _removed(text, "sky") == [12 * 30] and n == total - 12 * 30
    # flying pixels at depth edges
    text, _ = run()
    nw, nh = (int(v) for v in re.search(r"\(network (\d+)x(\d+)\)", text).groups())
    step = edge_step(h, w, nh, nw)  # compared across the resize from the network's resolution
    assert step == math.ceil(max(h / nh, w / nw)) > 1
    # a threshold that drops some pixels and keeps others on this (untrained, smooth) prediction
    rel = next(r for r in (0.002, 0.005, 0.01, 0.02, 0.05) if 0 < (~keep_not_edge(depth, r, step=step)).sum() < total)
    expected_edges = int((~keep_not_edge(depth, rel, step=step)).sum())
    text, n = run("--drop-edges", rel)
    assert _removed(text, "edge") == [expected_edges] and n == total - expected_edges
    # predicted uncertainty
    u_cut = float(np.median(unc))
    text, n = run("--max-uncertainty", u_cut)
    assert _removed(text, "uncertainty") == [int((unc > u_cut).sum())] and n == int((unc <= u_cut).sum())
    # all together: each pixel counts against the first filter that drops it
    text, n = run("--drop-beyond", cut, "--sky-mask", tmp_path / "sky.png", "--drop-edges", rel,
                  "--max-uncertainty", u_cut)
    sky = mask > 0
    beyond = ~sky & (depth > cut)
    edge = ~sky & ~beyond & ~keep_not_edge(depth, rel, step=step)
    uncertain = ~sky & ~beyond & ~edge & (unc > u_cut)
    assert _removed(text, "sky") == [int(sky.sum())]
    assert _removed(text, "beyond") == [int(beyond.sum())]
    assert _removed(text, "edge") == [int(edge.sum())]
    assert _removed(text, "uncertainty") == [int(uncertain.sum())]
    assert n == total - int((sky | beyond | edge | uncertain).sum())


def test_sky_masks_for_a_folder_and_bad_masks(trained, images, tmp_path, capsys):
    folder, sizes = images
    masks = tmp_path / "masks"
    masks.mkdir()
    for name, (h, w) in sizes.items():
        m = np.zeros((h, w), np.uint8)
        m[: h // 3] = 255
        Image.fromarray(m).save(masks / f"{Path(name).stem}.png")
    out = tmp_path / "m"
    rc, text, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out, "--pointcloud",
                              "--sky-mask", masks], capsys)
    assert rc == 0, err
    expected = [(h // 3) * w for h, w in sizes.values()]
    assert _removed(text, "sky") == expected
    assert [len(read_ply(out / f"{Path(n).stem}.ply")[0]) for n in sizes] == _kept(text)
    # one mask file for several images, a missing mask, a mask of the wrong size: one line, nothing written
    for mask, needle in ((masks / "a_wide.png", "one file for 2 images"), (tmp_path / "nomask", "sky mask not found")):
        rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", tmp_path / "n1", "--pointcloud",
                               "--sky-mask", mask], capsys)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder / "b_tall.jpg", "--out", tmp_path / "n2",
                           "--pointcloud", "--sky-mask", masks / "a_wide.png"], capsys)
    assert rc == 2 and "a_wide.png" in err and "expected 50x90" in err
    assert not (tmp_path / "n1").exists() and not (tmp_path / "n2").exists()


def test_explicit_intrinsics_are_used(trained, images, tmp_path, capsys):
    folder, sizes = images
    out = tmp_path / "k"
    rc, text, err = _predict(["--checkpoint", trained, "--input", folder / "b_tall.jpg", "--out", out,
                              "--pointcloud", "--save-npy", "--fx", 80, "--cx", 10, "--cy", 20], capsys)
    assert rc == 0, err
    depth = np.load(out / "b_tall_depth.npy")
    points, _ = read_ply(out / "b_tall.ply")
    h, w = sizes["b_tall.jpg"]
    u, v = np.tile(np.arange(w), h), np.repeat(np.arange(h), w)
    np.testing.assert_allclose(points[:, 0], (u - 10) * depth.reshape(-1) / 80, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(points[:, 1], (v - 20) * depth.reshape(-1) / 80, rtol=1e-4, atol=1e-4)
    assert "fx 80.0 fy 80.0 cx 10.0 cy 20.0" in text


@pytest.mark.parametrize("flags,needle", [
    (["--cy", 10], "--fy/--cx/--cy need --fx"),
    (["--fx", 80, "--cx", "nan"], "--cx must be a finite number, got nan"),
    (["--fx", 80, "--cy", "inf"], "--cy must be a finite number, got inf"),
    (["--max-uncertainty", "nan"], "--max-uncertainty must be a finite number, got nan"),
])
def test_bad_intrinsics_stop_the_run_before_any_output(trained, images, tmp_path, capsys, flags, needle):
    folder, _ = images  # two inputs: the first one's depth PNG was written before the error
    out = tmp_path / "k"
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out, "--pointcloud", *flags], capsys)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_output_names_never_collide(trained, tmp_path, capsys):
    """a.png and a.jpg keep their extension (a_png, a_jpg), which a_png.png's own stem would overwrite."""
    folder = tmp_path / "same"
    folder.mkdir()
    sizes = {"a.png": (30, 40), "a.jpg": (30, 50), "a_png.png": (30, 60)}
    for name, (h, w) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(folder / name)
    out = tmp_path / "o"
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out, "--save-npy"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("*_depth.npy")) == ["a_jpg_depth.npy", "a_png_2_depth.npy",
                                                              "a_png_depth.npy"]
    # inputs in name order: a.jpg, a.png, a_png.png; each output has its own input's size
    for stem, name in (("a_jpg", "a.jpg"), ("a_png", "a.png"), ("a_png_2", "a_png.png")):
        assert np.load(out / f"{stem}_depth.npy").shape == sizes[name]


def test_recursive_folders_mirror_their_subfolders_and_skip_outputs_masks_and_hidden(trained, tmp_path, capsys):
    """--recursive: each subfolder's outputs go to the same subfolder of --out (the same name in two
    folders does not collide), a mask folder mirrors the input, and the output and mask folders inside
    the input, hidden folders and hidden files are not read as photos."""
    root = tmp_path / "drive"
    sizes = {"a.png": (30, 40), "s1/a.png": (30, 50), "s1/deeper/b.jpg": (40, 30), "s2/c.png": (20, 60)}
    for rel, (h, w) in {**sizes, ".cache/x.png": (9, 9), "s2/._c.png": (9, 9)}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / rel)
    masks, out = root / "masks", root / "pred"
    for rel, (h, w) in sizes.items():
        m = np.zeros((h, w), np.uint8)
        m[:5] = 255
        (masks / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save((masks / rel).with_suffix(".png"))
    for _ in range(2):  # a second run reads neither its own earlier outputs nor the masks
        rc, text, err = _predict(["--checkpoint", trained, "--input", root, "--out", out, "--recursive",
                                  "--save-npy", "--pointcloud", "--sky-mask", masks], capsys)
        assert rc == 0, err
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*_depth.npy"))
        assert written == sorted(str(Path(r).with_suffix("")) + "_depth.npy" for r in sizes)
        for rel, (h, w) in sizes.items():
            assert np.load(out / (str(Path(rel).with_suffix("")) + "_depth.npy")).shape == (h, w)
        assert _removed(text, "sky") == [5 * w for _, (h, w) in sorted(sizes.items(),
                                                                   key=lambda kv: Path(kv[0]).parts)]
        # progress on every image's line: count, rate, time left
        counts = re.findall(r"\[(\d+)/(\d+), [\d.]+ img/s, ETA [\d:]+\]$", text, flags=re.M)
        assert counts == [(str(k), "4") for k in range(1, 5)]
    # another output folder: the first run's depth maps (under drive/pred) are outputs, not photos
    rc, text, err = _predict(["--checkpoint", trained, "--input", root, "--out", tmp_path / "o1", "--recursive",
                              "--pointcloud", "--sky-mask", masks], capsys)
    assert rc == 0 and "skipped 4 depth maps written by an earlier predict" in text, err
    assert len(list((tmp_path / "o1").rglob("*_depth.png"))) == 4
    # a mask missing in the mirrored place: one line naming the image and the mask path expected
    (masks / "s2" / "c.png").unlink()
    rc, _, err = _predict(["--checkpoint", trained, "--input", root, "--out", tmp_path / "o2", "--recursive",
                           "--pointcloud", "--sky-mask", masks], capsys)
    assert rc == 2 and str(masks / "s2" / "c.png") in err and len(err.strip().splitlines()) == 1
    # without --recursive only the folder's own image; a folder of subfolders only says what to add
    rc, text, err = _predict(["--checkpoint", trained, "--input", root, "--out", tmp_path / "o3"], capsys)
    assert rc == 0 and [p.name for p in (tmp_path / "o3").rglob("*_depth.png")] == ["a_depth.png"]
    assert "[" not in text.splitlines()[-1]  # one image: no progress counter
    rc, _, err = _predict(["--checkpoint", trained, "--input", root / "s1", "--out", tmp_path / "o4"], capsys)
    assert rc == 0, err
    rc, _, err = _predict(["--checkpoint", trained, "--input", root / "s2" / "..", "--out", tmp_path / "o5"], capsys)
    assert rc == 0, err
    # a linked subfolder is read like any other (datasets are often assembled from links); a link
    # back up the tree is not followed round in a loop
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(elsewhere / "far.png")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "sub").symlink_to(elsewhere, target_is_directory=True)
    (linked / "loop").symlink_to(linked, target_is_directory=True)
    rc, _, err = _predict(["--checkpoint", trained, "--input", linked, "--out", tmp_path / "o7", "--recursive"],
                          capsys)
    assert rc == 0, err
    assert [str(p.relative_to(tmp_path / "o7")) for p in (tmp_path / "o7").rglob("*_depth.png")] == ["sub/far_depth.png"]
    empty = tmp_path / "only_subfolders"
    (empty / "sub").mkdir(parents=True)
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(empty / "sub" / "x.png")
    rc, _, err = _predict(["--checkpoint", trained, "--input", empty, "--out", tmp_path / "o6"], capsys)
    assert rc == 2 and "add --recursive" in err and len(err.strip().splitlines()) == 1


def test_exif_orientation_is_applied_like_image_viewers_do(trained, tmp_path, capsys):
    """A phone photo stored 20x10 (WxH) with Orientation=6 is shown, and predicted, 10x20 upright."""
    from curriculum.predict import read_image

    stored = np.full((10, 20, 3), 40, np.uint8)
    stored[:, :4] = (250, 0, 0)  # the stored left columns are the top rows once rotated
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(photo, exif=exif.tobytes(), quality=95)
    rgb = read_image(photo)
    assert rgb.shape == (20, 10, 3) and rgb[:2, :, 0].min() > 200 and rgb[-4:, :, 0].max() < 100
    mask = tmp_path / "phone.png"  # the sky mask drawn on the upright photo fits it
    Image.fromarray(np.zeros((20, 10), np.uint8)).save(mask)
    out = tmp_path / "o"
    rc, text, err = _predict(["--checkpoint", trained, "--input", photo, "--out", out, "--save-npy", "--pointcloud",
                              "--sky-mask", mask], capsys)
    assert rc == 0, err
    assert np.load(out / "phone_depth.npy").shape == (20, 10) and "phone.jpg: 10x20" in text
    assert _kept(text) == [200]


def test_conflicting_max_depth_is_an_error(trained, images, tmp_path, capsys):
    folder, _ = images
    out = tmp_path / "x"
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out, "--max-depth", 80], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "conflicts with the checkpoint's range 1000 m" in err and str(trained) in err
    assert not out.exists()
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out, "--max-depth", 1000], capsys)
    assert rc == 0, err  # the same range is accepted
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out, "--encoder", "vits"], capsys)
    assert rc == 2 and "conflicts with the checkpoint's encoder tiny" in err
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out, "--pointcloud", "--drop-sky",
                           "--sky-depth", 2000], capsys)
    assert rc == 2 and "--sky-depth 2000 m lies outside the model's range (0.1-1000 m)" in err


def test_default_sky_depth_stays_within_the_models_range(trained, tmp_path):
    """A checkpoint whose recorded far target lies beyond its head's range (recipes refuse that now;
    older checkpoints may carry it) gets a --drop-sky threshold its predictions can reach."""
    from curriculum.checkpoint import META_KEY
    from curriculum.predict import load_predictor

    ckpt = torch.load(trained, map_location="cpu", weights_only=False)
    assert load_predictor(trained).sky_depth == pytest.approx(655.35 / 2)
    ckpt[META_KEY]["parent_far_target"] = 5000.0
    torch.save(ckpt, tmp_path / "far.ckpt")
    assert load_predictor(tmp_path / "far.ckpt").sky_depth == pytest.approx(0.98 * 1000)


def test_filters_need_a_point_cloud_and_an_uncertainty_head(trained, images, tmp_path, capsys):
    folder, _ = images
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", tmp_path / "o", "--drop-sky"], capsys)
    assert rc == 2 and "--drop-sky" in err and "--pointcloud" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def official(tmp_path):
    """An official-layout Depth-Anything-V2 metric state dict (bare, as released) of a tiny model."""
    torch.manual_seed(0)
    model = DepthModel("tiny", "sigmoid", 1e-3, 80.0).eval()
    path = tmp_path / "depth_anything_v2_metric_vkitti_tiny.pth"
    torch.save(official_state_dict(model), path)
    return path, model


def test_official_checkpoint_with_encoder_and_max_depth(official, images, tmp_path, capsys):
    path, model = official
    folder, sizes = images
    out = tmp_path / "off"
    rc, text, err = _predict(["--checkpoint", path, "--input", folder / "a_wide.png", "--out", out, "--encoder", "tiny",
                              "--max-depth", 80, "--input-size", 56, "--save-npy", "--pointcloud", "--drop-sky"],
                             capsys)
    assert rc == 0, err
    assert "official tiny, range 0.001..80 m" in text
    h, w = sizes["a_wide.png"]
    depth = np.load(out / "a_wide_depth.npy")
    nh, nw = network_size(h, w, 56)
    rgb = np.asarray(Image.open(folder / "a_wide.png").convert("RGB"))
    # Depth-Anything-V2's infer_image: / 255, cubic resize of the floats (no rounding or clipping)
    x = torch.from_numpy(cv2.resize(rgb / 255.0, (nw, nh), interpolation=cv2.INTER_CUBIC)).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        pred = model((x.float() - mean) / std).depth
    expected = F.interpolate(pred[:, None], size=(h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
    np.testing.assert_allclose(depth, expected, rtol=1e-5, atol=1e-5)
    assert depth.max() <= 80.0
    # sky of a sigmoid x 80 head: at or beyond 0.98 x 80 m
    assert "sky = predicted >= 78.4 m" in text
    assert _removed(text, "sky") == [int((depth >= 78.4).sum())]
    # without --encoder the size is inferred and said
    rc, text, err = _predict(["--checkpoint", path, "--input", folder / "a_wide.png", "--out", tmp_path / "o2",
                              "--max-depth", 80, "--input-size", 56], capsys)
    assert rc == 0 and "encoder inferred from the weights: tiny" in text
    # saved from a compiled model (`_orig_mod.` prefixes), as load_official reads it
    compiled = tmp_path / "compiled.pth"
    torch.save({f"_orig_mod.{k}": v for k, v in torch.load(path).items()}, compiled)
    rc, text, err = _predict(["--checkpoint", compiled, "--input", folder / "a_wide.png", "--out", tmp_path / "o3",
                              "--max-depth", 80, "--input-size", 56, "--save-npy"], capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "o3" / "a_wide_depth.npy"), depth)


def test_official_checkpoint_needs_max_depth(official, images, tmp_path, capsys):
    path, _ = official
    folder, _ = images
    rc, _, err = _predict(["--checkpoint", path, "--input", folder, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "records no depth range" in err and "--max-depth" in err
    assert len(err.strip().splitlines()) == 1
    # an official checkpoint predicts no uncertainty
    rc, _, err = _predict(["--checkpoint", path, "--input", folder, "--out", tmp_path / "o", "--max-depth", 80,
                           "--pointcloud", "--max-uncertainty", 0.5], capsys)
    assert rc == 2 and "predicts no uncertainty" in err


def test_bad_inputs_are_one_line_errors_naming_the_file(trained, images, tmp_path, capsys):
    folder, _ = images
    out = tmp_path / "bad"
    missing = tmp_path / "nope.png"
    rc, _, err = _predict(["--checkpoint", trained, "--input", missing, "--out", out], capsys)
    assert rc == 2 and str(missing) in err and len(err.strip().splitlines()) == 1
    broken = folder / "c_broken.png"
    broken.write_text("not an image")
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", out], capsys)
    assert rc == 2 and str(broken) in err and "cannot read image" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # every input is checked before anything is written
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _predict(["--checkpoint", trained, "--input", empty, "--out", out], capsys)
    assert rc == 2 and "no image" in err
    rc, _, err = _predict(["--checkpoint", tmp_path / "missing.ckpt", "--input", folder / "a_wide.png",
                           "--out", out], capsys)
    assert rc == 2 and "missing.ckpt" in err
    not_ckpt = tmp_path / "random.pt"
    torch.save({"weights": torch.zeros(3)}, not_ckpt)
    rc, _, err = _predict(["--checkpoint", not_ckpt, "--input", folder / "a_wide.png", "--out", out], capsys)
    assert rc == 2 and "neither a checkpoint of this project" in err


# ------------------------------------------------------------------------------- eval by hand

H, W = 56, 112  # multiples of 14: the network sees the frame at its own size


def _known_shards(folder: Path) -> None:
    """Two frames with known depth: rows 0-13 sky, 14-27 at 100 m, then two near bands, one hole row."""
    from data_prep.schema import encode_sample
    from data_prep.writer import ShardWriter

    bands = [(18.0, 30.0), (10.0, 50.0)]  # near bands (rows 28-41, rows 42-55) of frame 0 and frame 1
    with ShardWriter(folder, max_samples=2) as writer:
        for i, (d1, d2) in enumerate(bands):
            raw = np.zeros((H, W), np.uint16)
            sky = np.zeros((H, W), bool)
            sky[:14] = True
            raw[:14] = 65535
            raw[14:28] = 10000  # 100 m
            raw[28:42] = int(d1 * 100)
            raw[42:56] = int(d2 * 100)
            raw[41] = 0  # a row without measurement
            rgb = np.full((H, W, 3), 100, np.uint8)
            meta = {"source": "test", "scene": "known", "frame": i, "width": W, "height": H,
                    "fx": 50.0, "fy": 50.0, "cx": W / 2, "cy": H / 2, "depth_scale": 0.01}
            writer.write(encode_sample(f"test_known_{i:04d}", rgb, raw, meta, sky=sky))


class _Pattern(torch.nn.Module):
    """Predicts the same map for every image: 20 m, except 500 m in the right half of rows 0-27."""

    def forward(self, x):
        from curriculum.model import DepthPrediction

        b, _, h, w = x.shape
        depth = torch.full((b, h, w), 20.0)
        depth[:, :28, w // 2:] = 500.0
        return DepthPrediction(depth, None)


def test_eval_matches_hand_computed_numbers(tmp_path, capsys):
    from curriculum.evaluate import evaluate

    _known_shards(tmp_path / "val")
    meta = {"model": {"encoder": "pattern"}, "recipe": {"data": {"val_height": H, "val_width": W}}}
    report = evaluate("pattern", f"{tmp_path}/val/*.tar", "synthetic", batch_size=2, model=_Pattern(), meta=meta,
                      device="cpu", progress=False)
    m = report["metrics"]
    assert m["images"] == 2
    # frame 0: 13 rows at 18 m (row 41 is a hole), 14 rows at 30 m, all predicted 20 m
    n1, n2 = 13 * W, 14 * W
    abs_rel_0 = (n1 * 2 / 18 + n2 * 10 / 30) / (n1 + n2)
    d1_0 = n1 / (n1 + n2)  # 20/18 = 1.11 < 1.25; 30/20 = 1.5
    rmse_0 = math.sqrt((n1 * 4 + n2 * 100) / (n1 + n2))
    # frame 1: 13 rows at 10 m, 14 rows at 50 m
    abs_rel_1 = (n1 * 10 / 10 + n2 * 30 / 50) / (n1 + n2)
    d1_1 = 0.0  # ratios 2.0 and 2.5
    rmse_1 = math.sqrt((n1 * 100 + n2 * 900) / (n1 + n2))
    assert m["near/abs_rel"] == pytest.approx((abs_rel_0 + abs_rel_1) / 2, rel=1e-6)  # mean over images
    assert m["near/d1"] == pytest.approx((d1_0 + d1_1) / 2, rel=1e-6)
    assert m["near/rmse"] == pytest.approx((rmse_0 + rmse_1) / 2, rel=1e-6)
    # bins: [0, 20) holds 18 m and 10 m (one image each), [20, 40) only 30 m, [40, 80] only 50 m
    assert m["near/0_20/abs_rel"] == pytest.approx((2 / 18 + 1.0) / 2, rel=1e-6)
    assert m["near/0_20/images"] == 2
    assert m["near/20_40/abs_rel"] == pytest.approx(10 / 30, rel=1e-6) and m["near/20_40/images"] == 1
    assert m["near/40_80/abs_rel"] == pytest.approx(30 / 50, rel=1e-6) and m["near/40_80/images"] == 1
    # far (100 m, rows 14-27): left half predicted 20 m, right half 500 m
    assert m["far/abs_rel"] == pytest.approx((80 / 100 + 400 / 100) / 2, rel=1e-6)
    # phantom: half of the sky and half of the far pixels are predicted within 80 m
    assert m["phantom_rate"] == pytest.approx(0.5) and m["sky/phantom_rate"] == pytest.approx(0.5)
    assert m["far/phantom_rate"] == pytest.approx(0.5)
    assert m["beyond_pixels"] == 2 * 28 * W


def test_eval_of_non_finite_predictions_counts_and_warns(tmp_path):
    """NaN on sky and far rows and one NaN near pixel: the near metrics stay numbers, the NaN
    pixels count as phantoms, and the report says how many predictions were not finite."""
    from curriculum.evaluate import METRIC_COLUMNS, evaluate, format_table, write_json
    from curriculum.model import DepthPrediction

    class NaNs(torch.nn.Module):
        def forward(self, x):
            b, _, h, w = x.shape
            depth = torch.full((b, h, w), 20.0)
            depth[:, :28] = math.nan  # sky and far rows
            depth[:, 40, 5] = math.nan  # one pixel of the near range
            return DepthPrediction(depth, None)

    _known_shards(tmp_path / "val")
    meta = {"model": {}, "recipe": {"data": {"val_height": H, "val_width": W}}}
    report = evaluate("nans", f"{tmp_path}/val/*.tar", "synthetic", batch_size=2, model=NaNs(), meta=meta,
                      device="cpu", progress=False)
    m = report["metrics"]
    assert m["nonfinite_pixels"] == 2 * (28 * W + 1)
    assert m["near/images"] == 2 and all(m[f"near/{c}"] is not None for c in ("abs_rel", "rmse", "silog", "d1"))
    assert m["phantom_rate"] == 1.0 and m["sky/phantom_rate"] == 1.0 and m["far/phantom_rate"] == 1.0
    table = format_table(report).splitlines()
    assert [line for line in table if line.startswith("warning:")] == [
        f"warning: {2 * (28 * W + 1)} predicted pixels are not finite (NaN or inf): left out of the error "
        "metrics, counted as phantoms on far and sky pixels"]
    # columns stay apart whatever their width (an error of 56.3519 beside 43095.3079 ran together)
    header = next(line for line in table if line.startswith("range"))
    assert header.split() == ["range", *METRIC_COLUMNS, "images"]
    report["metrics"].update({"near/abs_rel": 56.3519, "near/sq_rel": 43095.3079})
    near = next(line for line in format_table(report).splitlines() if line.startswith("near"))
    assert "56.3519 43095.3079" in near
    write_json(report, tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["nonfinite_pixels"] == 2 * (28 * W + 1)
    report["metrics"]["nonfinite_pixels"] = 0
    assert "warning" not in format_table(report)


def _constant_checkpoint(tmp_path: Path) -> Path:
    """A real checkpoint file whose output is 20 m everywhere: zero weights in the last convolution."""
    from curriculum.checkpoint import build_metadata

    model = DepthModel("tiny", "log", 0.1, 1000.0)
    last = model.depth_head.scratch.output_conv2[2]
    torch.nn.init.zeros_(last.weight)
    s = (math.log(20.0) - math.log(0.1)) / (math.log(1000.0) - math.log(0.1))
    torch.nn.init.constant_(last.bias, math.log(s / (1 - s)))
    recipe = {"data": {"val_height": H, "val_width": W}, "stages": []}
    ckpt = {"curriculum": build_metadata(model.metadata(), {"name": "max_depth"}, "finetune", recipe),
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    torch.save(ckpt, tmp_path / "const.ckpt")
    return tmp_path / "const.ckpt"


def test_cli_eval_of_an_official_checkpoint(tmp_path, capsys):
    """An official Depth-Anything-V2 metric state dict (sigmoid x max_depth, no metadata): its
    range and encoder come from the flags; 20 m everywhere scores as the constant checkpoint."""
    _known_shards(tmp_path / "val")
    model = DepthModel("tiny", "sigmoid", 1e-3, 80.0)
    last = model.depth_head.scratch.output_conv2[2]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, math.log(0.25 / 0.75))  # sigmoid -> 0.25: 20 m of 80
    torch.save(official_state_dict(model), tmp_path / "depth_anything_v2_metric_vkitti_tiny.pth")
    args = ["eval", "--checkpoint", str(tmp_path / "depth_anything_v2_metric_vkitti_tiny.pth"),
            "--shards", f"{tmp_path}/val/*.tar", "--height", str(H), "--width", str(W)]
    assert cli_main(args) == 2
    assert "records no depth range: give --max-depth" in capsys.readouterr().err
    assert cli_main([*args, "--max-depth", "80", "--encoder", "tiny", "--out", str(tmp_path / "o.json")]) == 0
    assert "phantom rate" in capsys.readouterr().out
    official = json.loads((tmp_path / "o.json").read_text())
    assert official["stage"] == "official Depth-Anything-V2"
    assert official["model"]["head"] == "sigmoid" and official["model"]["max_depth"] == 80.0
    assert cli_main(["eval", "--checkpoint", str(_constant_checkpoint(tmp_path)), "--shards", f"{tmp_path}/val/*.tar",
                     "--out", str(tmp_path / "c.json")]) == 0
    constant = json.loads((tmp_path / "c.json").read_text())
    for key in ("near/abs_rel", "phantom_rate", "images"):
        assert official["metrics"][key] == pytest.approx(constant["metrics"][key], rel=1e-5), key


def test_cli_eval_of_a_constant_depth_checkpoint(tmp_path, capsys):
    _known_shards(tmp_path / "val")
    rc = cli_main(["eval", "--checkpoint", str(_constant_checkpoint(tmp_path)), "--shards", f"{tmp_path}/val/*.tar",
                   "--out", str(tmp_path / "e.json")])
    assert rc == 0
    assert oct((tmp_path / "e.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    import json

    m = json.loads((tmp_path / "e.json").read_text())["metrics"]
    n1, n2 = 13 * W, 14 * W
    abs_rel = ((n1 * 2 / 18 + n2 * 10 / 30) / (n1 + n2) + (n1 * 1.0 + n2 * 0.6) / (n1 + n2)) / 2
    assert m["near/abs_rel"] == pytest.approx(abs_rel, rel=1e-4)
    assert m["phantom_rate"] == 1.0  # 20 m everywhere: every sky and far pixel lands within 80 m
    out = capsys.readouterr().out
    assert "phantom rate" in out and "figures:" in out
    # the same results as pictures: bars per range and phantom rates, and a panel per image
    bars = np.asarray(Image.open(tmp_path / "e.png"))
    assert bars.ndim == 3 and bars.shape[0] > 100
    examples = np.asarray(Image.open(tmp_path / "e_examples.png"))
    # rgb | ground truth | prediction | error, one row per frame, titled, with a colour bar
    assert examples.ndim == 3 and examples.shape[1] > 4 * W and examples.shape[0] > 2 * H
    assert "examples" not in json.loads((tmp_path / "e.json").read_text())


def test_far_target_taught_along_the_lineage():
    """--drop-sky's default: a fine-tune whose own stages leave the sky unsupervised keeps the far
    target its init_from parent taught; recipes that never supervised the sky have none."""
    def meta(*policies, parent=None):
        return {"recipe": {"stages": [{"policy": p} for p in policies]}, "parent_far_target": parent}

    pretrain = meta({"name": "unclipped", "far_target": 655.35})
    assert taught_far_target(pretrain) == 655.35
    assert taught_far_target(meta({"name": "max_depth"}, parent=taught_far_target(pretrain))) == 655.35
    assert taught_far_target(meta({"name": "max_depth"})) is None
    assert taught_far_target(meta({"name": "mixed", "far_weight": 0.0, "far_target": 300.0})) is None
    assert taught_far_target(meta({"name": "mixed", "far_weight": 0.1, "far_target": 300.0}, parent=200.0)) == 300.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--max-images", "-1"], "--max-images -1: must be at least 0"),
    (["--height", "100"], "--height 100: must be a positive multiple of 14"),
    (["--out", "{tmp}"], "give a .json file name"),
    (["--out", "{tmp}/report.png"], "give a .json file name"),  # the figure would overwrite it
    (["--shards", "{tmp}/junk.tar"], "no image evaluated"),
])
def test_eval_refuses_bad_arguments_and_empty_sets_in_one_line(tmp_path, capsys, args, needle):
    _known_shards(tmp_path / "val")
    (tmp_path / "junk.tar").write_text("not a tar")
    args = [a.format(tmp=tmp_path) for a in args]
    shards = [] if "--shards" in args else ["--shards", f"{tmp_path}/val/*.tar"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the junk tar's own warning
        rc = cli_main(["eval", "--checkpoint", str(_constant_checkpoint(tmp_path)), *shards, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and needle in err[-1] and err[-1].startswith("error: "), err
    assert not list(tmp_path.glob(".*.tmp"))


def test_eval_reports_skipped_samples_and_warns_about_stretched_images(tmp_path, capsys):
    from curriculum.evaluate import evaluate, format_table

    _known_shards(tmp_path / "val")
    shard = next((tmp_path / "val").glob("*.tar"))
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    shard.write_bytes(shard.read_bytes()[:end])  # no end-of-archive marker: the last frame is dropped
    with pytest.warns(UserWarning) as record:
        report = evaluate(str(_constant_checkpoint(tmp_path)), str(shard), height=H, width=2 * W, progress=False)
    assert report["bad_samples"] == 1 and report["metrics"]["images"] == 1
    assert any(f"{W}x{H} images are resized to the network input {2 * W}x{H}" in str(w.message) for w in record)
    assert f"each resized to {2 * W}x{H} for the network; 1 bad samples skipped" in format_table(report)


def test_eval_keeps_the_frames_aspect_ratio_unless_told_a_size(tmp_path):
    """Frames of another aspect ratio than the recipe's validation size are seen at their own,
    with the recipe's shorter side (Depth-Anything-V2's evaluation and predict resize so), not
    squeezed; a size given is used as it is, with the squeeze warning."""
    from curriculum.evaluate import evaluate, input_size_for

    assert input_size_for((375, 1242), (518, 518)) == (518, 1722)  # a KITTI frame, official checkpoints
    assert input_size_for((375, 1242), (518, 1708)) == (518, 1708)  # the GPU recipes' KITTI-shaped size
    assert input_size_for((140, 420), (140, 420)) == (140, 420)
    assert input_size_for((768, 1024), (140, 420)) == (140, 182)  # Hypersim with the demo recipe
    assert input_size_for(None, (140, 420)) == (140, 420)
    assert input_size_for((4, 400), (518, 518)) == (518, 518)  # a strip: too many tokens at its own ratio
    _known_shards(tmp_path / "val")  # 112x56 frames; the checkpoint's recipe says 56x56
    ckpt = _constant_checkpoint(tmp_path)
    state = torch.load(ckpt, weights_only=False)
    state["curriculum"]["recipe"]["data"] = {"val_height": H, "val_width": H}
    torch.save(state, ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no squeeze warning
        report = evaluate(str(ckpt), f"{tmp_path}/val/*.tar", progress=False)
    assert report["input_size"] == [H, W] and report["metrics"]["images"] == 2
    with pytest.warns(UserWarning, match=f"{W}x{H} images are resized to the network input {H}x{H}"):
        assert evaluate(str(ckpt), f"{tmp_path}/val/*.tar", height=H, width=H, progress=False)["input_size"] == [H, H]


def test_predict_refuses_a_file_as_output_folder_before_loading(trained, images, tmp_path, capsys):
    folder, _ = images
    (tmp_path / "afile").write_text("")
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", tmp_path / "afile"], capsys)
    assert rc == 2 and "--out" in err and "exists and is not a folder" in err and len(err.strip().splitlines()) == 1


def test_image_panels_show_sky_at_the_far_colour_whatever_its_stored_depth():
    """The one panel maker of evaluation and of the training run's logged panels: sky pixels are
    ground truth at the far value even where a data set stores a finite depth there; a larger
    rgb is brought to the prediction's size."""
    from curriculum.evaluate import image_panel
    from curriculum.viz import depth_panel

    depth = torch.full((1, 6, 8), 12.0)
    depth[0, :2] = 30.0  # a finite depth stored under the sky mask
    sky = torch.zeros(1, 6, 8, dtype=torch.bool)
    sky[0, :2] = True
    rgb = torch.randint(0, 255, (1, 3, 12, 16), dtype=torch.uint8)
    pred = torch.full((6, 8), 11.0)
    panel = image_panel({"depth": depth, "sky": sky, "rgb": rgb}, 0, pred, 700.0, rgb_key="rgb")
    gt = depth[0].numpy().copy()
    gt[:2] = np.inf
    want = depth_panel(cv2.resize(rgb[0].permute(1, 2, 0).numpy(), (8, 6)), gt, pred.numpy(), vmin=1.0, vmax=700.0)
    assert panel.shape == (6, 32, 3)
    assert np.array_equal(panel[:, 8:], want[:, 8:])  # ground truth, prediction and error
    stored = depth_panel(rgb[0].permute(1, 2, 0).numpy(), depth[0].numpy(), pred.numpy(), vmin=1.0, vmax=700.0)
    assert not np.array_equal(panel[:2, 8:16], stored[:2, 8:16])  # not at the stored 30 m's colour


def test_eval_figures_name_the_run_and_stage_of_their_checkpoint():
    from curriculum.evaluate import checkpoint_label

    assert checkpoint_label({"checkpoint": "runs/demo/finetune/checkpoints/last.ckpt", "stage": "finetune"}) == \
        "demo/finetune/last.ckpt (finetune)"
    assert checkpoint_label({"checkpoint": "model.ckpt", "stage": None}) == "model.ckpt"
    assert checkpoint_label({"checkpoint": "/x.pth"}) == "/x.pth"


def test_predict_refuses_settings_that_would_fail_later(trained, images, tmp_path, capsys):
    """Each a one-line error before any output: torch's or matplotlib's own would come as a
    traceback after the model loaded (or, for the output folder, only on the next run)."""
    folder, _ = images
    image = folder / "a_wide.png"
    out = tmp_path / "out"
    cases = [(["--input", folder, "--out", folder], "is the input folder"),
             (["--input", image, "--out", out, "--vmax", "inf"], "colour range needs 0 < --vmin < --vmax"),
             # the trained model's range ends at 1000 m: a --vmin above it, with --vmax left to default
             (["--input", image, "--out", out, "--vmin", "2000"],
              "got 2000, 1000 (--vmax defaults to the model's max depth: give --vmin below it)"),
             (["--input", image, "--out", out, "--input-size", "0"], "--input-size must be a positive multiple"),
             (["--input", image, "--out", out, "--device", "tpu0"], "--device 'tpu0': not a device")]
    if not torch.cuda.is_available():
        cases.append((["--input", image, "--out", out, "--device", "cuda"], "--device cuda: no CUDA device"))
    strip = tmp_path / "strip"
    strip.mkdir()
    Image.fromarray(np.zeros((4, 400, 3), np.uint8)).save(strip / "strip.png")  # 100:1
    cases.append((["--input", strip, "--out", out], "strip.png: 400x4 would enter the network as"))
    for flags, needle in cases:
        rc, _, err = _predict(["--checkpoint", trained, *flags], capsys)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not out.exists() and sorted(p.name for p in folder.iterdir()) == ["a_wide.png", "b_tall.jpg"]


def test_file_names_are_titles_as_they_are(trained, tmp_path, capsys):
    """A "$" pair in a file name is text, not matplotlib math (which failed on "$1_$2")."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(folder / "run_$1_$2.png")
    rc, _, err = _predict(["--checkpoint", trained, "--input", folder, "--out", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert (tmp_path / "out" / "run_$1_$2_depth.png").is_file()


def test_a_library_error_spanning_lines_prints_as_one(monkeypatch, capsys):
    import curriculum.cli as cli

    def fails(argv):
        raise ValueError("Expected end of text, found '$'\n  (at char 4), (line:1, col:5)")
    monkeypatch.setitem(cli.COMMANDS, "predict", fails)
    rc, _, err = _predict([], capsys)
    assert rc == 2 and err == "error: Expected end of text, found '$' (at char 4), (line:1, col:5)\n"


def _drop_last_frame(shard) -> None:
    """Cut a shard before its end-of-archive marker: the reader drops (and counts) its last frame."""
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    shard.write_bytes(shard.read_bytes()[:end])


_PATTERN_META = {"model": {}, "recipe": {"data": {"val_height": H, "val_width": W}}}


def test_eval_scores_only_the_protocols_crop(tmp_path):
    """kitti_garg keeps rows [22, 55) and columns [4, 107) of a 56x112 frame: the sky rows fall out,
    six far rows and 13 rows of each near band stay (row 41 is a hole, row 55 is cut)."""
    from curriculum.evaluate import evaluate, protocol_text

    _known_shards(tmp_path / "val")
    report = evaluate("pattern", f"{tmp_path}/val/*.tar", "kitti_garg", batch_size=2, model=_Pattern(),
                      meta=_PATTERN_META, device="cpu", progress=False)
    m = report["metrics"]
    assert report["protocol_text"] == protocol_text("kitti_garg", 1e-3, 80.0)
    assert m["beyond_pixels"] == 2 * 6 * 103  # far rows 22-27 x columns 4-106; no sky pixel
    frame0 = (13 * 2 / 18 + 13 * 10 / 30) / 26
    frame1 = (13 * 10 / 10 + 13 * 30 / 50) / 26
    assert m["near/abs_rel"] == pytest.approx((frame0 + frame1) / 2, rel=1e-6)
    # far rows: columns 4-55 predicted 20 m (error 0.8), columns 56-106 predicted 500 m (error 4.0)
    assert m["far/abs_rel"] == pytest.approx((52 * 0.8 + 51 * 4.0) / 103, rel=1e-6)


def test_eval_adds_up_the_bad_samples_of_every_batch(tmp_path):
    """Three shards read one image per batch; the first two lose their last frame, so the two
    skipped samples travel with different batches (and the last batch carries none)."""
    from curriculum.evaluate import evaluate

    for name in ("a", "b", "c"):
        _known_shards(tmp_path / name)
    for name in ("a", "b"):
        _drop_last_frame(next((tmp_path / name).glob("*.tar")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate("pattern", f"{tmp_path}/{{a,b,c}}/*.tar", "synthetic", batch_size=1, model=_Pattern(),
                          meta=_PATTERN_META, device="cpu", progress=False)
    assert report["metrics"]["images"] == 4 and report["bad_samples"] == 2


def test_eval_sizes_examples_and_empty_ranges(tmp_path):
    """--height/--width win over the checkpoint's validation size; ``examples`` keeps exactly that
    many panels; a range without an image is None (JSON null), not NaN."""
    from curriculum.evaluate import evaluate

    _known_shards(tmp_path / "val")
    report = evaluate("pattern", f"{tmp_path}/val/*.tar", "synthetic", batch_size=2, model=_Pattern(),
                      meta=_PATTERN_META, device="cpu", progress=False, height=28, width=56, examples=1)
    assert report["input_size"] == [28, 56] and report["metrics"]["images"] == 2
    assert len(report["examples"]) == 1  # of two images
    report = evaluate("pattern", f"{tmp_path}/val/*.tar", "synthetic", batch_size=2, model=_Pattern(),
                      meta=_PATTERN_META, device="cpu", progress=False, max_images=1)
    assert "examples" not in report
    m = report["metrics"]
    assert m["images"] == 1 and m["near/40_80/images"] == 0  # frame 0 has 18 m and 30 m only
    assert m["near/40_80/abs_rel"] is None and m["near/20_40/abs_rel"] is not None


def test_protocol_text_names_each_protocols_crop():
    from curriculum.evaluate import protocol_text

    crops = {"kitti_garg": "Garg crop", "kitti_eigen": "Eigen crop", "nyu": "NYU crop", "synthetic": "no crop",
             "none": "no crop"}
    for protocol, crop in crops.items():
        assert protocol_text(protocol, 1e-3, 80.0).startswith(f"protocol {protocol}: {crop}; near range 0.001..80 m")


def test_format_table_puts_each_number_under_its_column_and_range():
    from curriculum.evaluate import GROUPS, METRIC_COLUMNS, format_table

    metrics = {"images": 3, "phantom_rate": 0.25, "far/phantom_rate": 0.5, "sky/phantom_rate": None}
    for gi, (_, group) in enumerate(GROUPS):
        for ci, column in enumerate(METRIC_COLUMNS):
            metrics[f"{group}/{column}"] = gi + ci / 10  # a different number in every cell
        metrics[f"{group}/images"] = gi
    metrics["far/silog"] = math.nan
    metrics["near/rmse"] = None
    report = {"protocol_text": "protocol x", "input_size": [H, W], "bad_samples": 0, "metrics": metrics}
    lines = format_table(report).splitlines()
    assert lines[0] == "protocol x" and lines[1] == f"images: 3, each resized to {W}x{H} for the network"
    assert lines[2].split() == ["range", *METRIC_COLUMNS, "images"]
    labels = {"near": "near (<= 80 m)", "near/0_20": "[0, 20)", "near/20_40": "[20, 40)", "near/40_80": "[40, 80]",
              "far": "far (> 80 m)"}
    for gi, (line, (_, group)) in enumerate(zip(lines[3:8], GROUPS)):
        assert line.strip().startswith(labels[group])
        cells = line[16:].split()
        want = ["n/a" if (group, c) in (("far", "silog"), ("near", "rmse")) else f"{gi + ci / 10:.4f}"
                for ci, c in enumerate(METRIC_COLUMNS)]
        assert cells == [*want, str(gi)], (group, line)
    assert lines[8] == "phantom rate (gt beyond 80 m or sky, predicted within 80 m): 0.2500  far: 0.5000  sky: n/a"
    assert "bad samples" not in format_table(report)


def test_eval_counts_a_bad_sample_found_after_the_last_full_batch(tmp_path):
    from curriculum.evaluate import evaluate

    _known_shards(tmp_path / "val")
    _drop_last_frame(next((tmp_path / "val").glob("*.tar")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate("pattern", f"{tmp_path}/val/*.tar", "synthetic", batch_size=1, model=_Pattern(),
                          meta=_PATTERN_META, device="cpu", progress=False)
    assert report["metrics"]["images"] == 1 and report["bad_samples"] == 1


def test_eval_chart_keeps_an_empty_last_slot_inside_its_axes(tmp_path, monkeypatch):
    """Shards without sky: the sky bar's "n/a" sits inside the phantom chart, not on its edge."""
    import curriculum.viz as viz
    from curriculum import evaluate as evaluate_mod

    figures = []  # save_figures imports viz.save_figure when called
    monkeypatch.setattr(viz, "save_figure", lambda fig, path: figures.append(fig) or Path(path))
    metrics = {"images": 3, "phantom_rate": 0.4, "far/phantom_rate": 0.4, "sky/phantom_rate": None}
    report = {"checkpoint": "x.ckpt", "protocol": "kitti_garg", "metrics": metrics}
    evaluate_mod.save_figures(report, tmp_path / "eval")
    for ax in figures[0].axes:
        slots = len(ax.get_xticks())
        left, right = ax.get_xlim()
        assert left <= -0.5 and right >= slots - 0.5, (ax.get_title(), ax.get_xlim())


def test_eval_sizes_the_input_without_tripping_on_a_broken_first_sample(tmp_path):
    """The first readable meta.json gives the frames' size; one nested past the JSON parser's depth
    is skipped (evaluation then reports it as a bad sample), not a traceback."""
    import io

    from curriculum.evaluate import first_frame_size

    _known_shards(tmp_path / "val")
    shard = next((tmp_path / "val").glob("*.tar"))
    broken = tmp_path / "broken.tar"
    with tarfile.open(shard) as src, tarfile.open(broken, "w") as dst:
        first = None
        for m in src:
            data = src.extractfile(m).read()
            first = first or m.name.split(".")[0]
            if m.name == f"{first}.meta.json":
                data = b"[" * 100000 + b"]" * 100000
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    assert first_frame_size([str(broken)]) == (H, W)  # from the second sample
    assert first_frame_size([str(tmp_path / "missing.tar")]) is None


def test_eval_feeds_official_checkpoints_floats_as_depth_anything_v2_does(tmp_path, monkeypatch):
    """An official checkpoint sees each frame resized as floats in [0, 1] (cubic overshoot kept),
    normalised from there, as Depth-Anything-V2's evaluation feeds it; this project's checkpoints
    keep the uint8 resize they were validated with."""
    from curriculum import evaluate as evaluate_mod
    from curriculum.data import ValStream
    from curriculum.evaluate import evaluate, format_table, load_official_for_eval
    from data_prep.schema import decode_sample

    _known_shards(tmp_path / "val")
    shards = f"{tmp_path}/val/*.tar"
    raw = next(iter(ValStream([str(next((tmp_path / "val").glob("*.tar")))], 0, 1, 1, 28, 56, float_images=True)))
    with tarfile.open(next((tmp_path / "val").glob("*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    key = sorted({n.split(".")[0] for n in members})[0]
    rgb = decode_sample({"__key__": key, **{n.split(".", 1)[1]: b for n, b in members.items()
                                            if n.startswith(key + ".")}})["rgb"]
    expected = cv2.resize(rgb.astype(np.float32) / 255.0, (56, 28), interpolation=cv2.INTER_CUBIC)
    assert raw["image"].dtype == torch.float32
    np.testing.assert_allclose(raw["image"][0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)

    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(x.clone())
            return self.inner(x)

    model = DepthModel("tiny", "sigmoid", 1e-3, 80.0)
    torch.save(official_state_dict(model), tmp_path / "official.pth")
    loaded, meta = load_official_for_eval(str(tmp_path / "official.pth"), torch.load(tmp_path / "official.pth"),
                                          "tiny", 80.0)
    report = evaluate(str(tmp_path / "official.pth"), shards, height=28, width=56, model=Recording(loaded),
                      meta=meta, progress=False, examples=1)
    assert report["input_resize"] == "float cubic" and "(as floats, as Depth-Anything-V2 evaluates)" in format_table(report)
    np.testing.assert_allclose(seen[0][0], normalize_images(torch.from_numpy(expected).permute(2, 0, 1)[None], 1.0)[0],
                               rtol=0, atol=1e-5)
    assert report["examples"][0].dtype == np.uint8  # the panel's rgb from the floats
    seen.clear()
    ours = evaluate(str(_constant_checkpoint(tmp_path)), shards, height=28, width=56, progress=False)
    assert ours["input_resize"] == "uint8 cubic"
