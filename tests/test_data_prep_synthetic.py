"""Synthetic outdoor scenes: determinism, depth ranges, sky and far shares, CLI + checker."""

import time

import numpy as np
import pytest

from data_prep import check, synthetic
from data_prep.schema import FAR_RAW
from data_prep.writer import read_index

W, H = 210, 70


def test_deterministic_for_seed_and_index():
    a = synthetic.render(3, 7, W, H)
    b = synthetic.render(3, 7, W, H)
    for k in ("rgb", "depth", "sky"):
        np.testing.assert_array_equal(a[k], b[k])
    c = synthetic.render(4, 7, W, H)
    d = synthetic.render(3, 8, W, H)
    assert not np.array_equal(a["rgb"], c["rgb"]) and not np.array_equal(a["rgb"], d["rgb"])
    assert not np.array_equal(a["depth"], c["depth"])


def test_depth_ranges_and_shares():
    sky, far, near = [], [], []
    layouts = set()
    for i in range(24):
        r = synthetic.render(0, i, W, H)
        depth, s = r["depth"], r["sky"]
        layouts.add(r["layout"])
        assert r["rgb"].shape == (H, W, 3) and r["rgb"].dtype == np.uint8
        assert np.isposinf(depth[s]).all()  # sky is beyond range
        finite = depth[~s]
        assert np.isfinite(finite).all() and (finite > 0).all() and finite.max() < 655.0
        sky.append(s.mean())
        far.append(((depth > 80) & ~s).mean())
        near.append((depth <= 80).mean())
        assert r["fx"] == pytest.approx(721.5377 * W / 1242)
    assert layouts == set(synthetic.LAYOUTS)
    assert 0.08 < np.mean(sky) < 0.35, np.mean(sky)
    assert 0.06 < np.mean(far) < 0.35, np.mean(far)
    assert np.mean(near) > 0.4
    # objects from a few metres to hundreds of metres appear
    all_depth = np.concatenate([synthetic.render(0, i, W, H)["depth"].ravel() for i in range(4)])
    fin = all_depth[np.isfinite(all_depth)]
    assert fin.min() < 10 and np.percentile(fin, 99) > 300


def test_planar_depth_of_ground():
    # For a level camera the ground at image row v has planar depth h * fy / (v - cy).
    sc = synthetic.make_scene(np.random.default_rng(0), W, H)
    sc.rot = np.eye(3)
    sc.boxes = sc.boxes[:0]
    sc.box_obj = sc.box_obj[:0]
    sc.spheres = sc.spheres[:0]
    sc.sphere_obj = sc.sphere_obj[:0]
    dirs = synthetic.ray_directions(sc)
    buf = synthetic.cast(sc, dirs)
    v = H - 1
    expected = sc.origin[1] * sc.fy / (v - sc.cy)
    np.testing.assert_allclose(buf.t[v], expected, rtol=1e-9)


def test_haze_grows_with_distance():
    # Same scene with and without haze: far pixels move toward the haze colour, near ones barely.
    rural = next(i for i in range(50) if synthetic.render(0, i, 32, 16)["layout"] == "rural")

    def shaded(beta):
        rng = np.random.default_rng([0, rural])
        sc = synthetic.make_scene(rng, W, H)
        sc.haze_beta = beta
        sc.sensor_noise = 0.0
        dirs = synthetic.ray_directions(sc)
        buf = synthetic.cast(sc, dirs)
        return sc, buf, synthetic.shade(sc, dirs, buf, rng).astype(float) / 255

    sc, buf, clear = shaded(0.0)
    _, _, hazy = shaded(1 / 300)
    haze = sc.haze_col * sc.exposure
    gap_clear = np.abs(clear - haze).mean(-1)
    gap_hazy = np.abs(hazy - haze).mean(-1)
    near = buf.t < 15
    far = np.isfinite(buf.t) & (buf.t > 200)
    assert near.sum() > 100 and far.sum() > 100
    assert (gap_hazy[far] < 0.5 * gap_clear[far] + 0.01).mean() > 0.9
    assert np.abs(hazy[near] - clear[near]).max() < 0.1


def test_cli_writes_valid_shards(tmp_path, capsys):
    out = tmp_path / "train"
    rc = synthetic.main(["--out", str(out), "--frames", "10", "--seed", "5", "--width", "64",
                         "--height", "32", "--workers", "1", "--shard-size", "4", "--no-progress"])
    assert rc == 0
    assert "wrote 10 samples in 3 shard(s)" in capsys.readouterr().out
    index = read_index(out)
    assert index["total"] == 10 and [s["samples"] for s in index["shards"]] == [4, 4, 2]
    assert check.main([str(out)]) == 0
    table = capsys.readouterr().out
    assert "synthetic (10)" in table and "64x32 (10)" in table and "jpg (10)" in table


def test_same_bytes_for_any_worker_count(tmp_path):
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert synthetic.main(["--out", str(out), "--frames", "6", "--width", "48", "--height", "24",
                               "--workers", workers, "--shard-size", "4", "--no-progress",
                               "--rgb-format", "png"]) == 0
        outs.append(out)
    for name in ("shard-000000.tar", "shard-000001.tar", "index.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_sample_contents(tmp_path):
    out = tmp_path / "val"
    assert synthetic.main(["--out", str(out), "--frames", "2", "--seed", "1000000", "--width", "64",
                           "--height", "32", "--workers", "1", "--no-progress"]) == 0
    problems = []
    from data_prep.schema import decode_sample

    (shard,) = out.glob("*.tar")
    samples = [decode_sample(s) for s in check.read_shard(shard, problems)]
    assert problems == []
    d = samples[0]
    assert d["key"] == "synthetic_seed1000000_000000"
    assert d["meta"]["depth_scale"] == 0.01 and d["meta"]["seed"] == 1000000
    np.testing.assert_array_equal(d["sky"], d["depth_raw"] == FAR_RAW)
    ref = synthetic.render(1000000, 0, 64, 32)
    np.testing.assert_array_equal(d["sky"], ref["sky"])
    np.testing.assert_array_equal(d["depth_raw"][~ref["sky"]],
                                  np.rint(ref["depth"][~ref["sky"]] / 0.01).astype(np.uint16))


def test_bad_arguments(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path / "o"), "--frames", "0"]) == 2
    assert "--frames" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_set_time_budget(tmp_path, capsys):
    # The Makefile's demo set (train + val) must be generated in under 3 minutes on 2 cores.
    t0 = time.perf_counter()
    for split, frames, seed in (("train", 480, 0), ("val", 64, 1000000)):
        assert synthetic.main(["--out", str(tmp_path / split), "--frames", str(frames), "--seed", str(seed),
                               "--workers", "2", "--no-progress"]) == 0
    assert time.perf_counter() - t0 < 180
    assert check.main([str(tmp_path / "train"), "--quiet"]) == 0
