"""python -m data_prep.check: good folders pass, each kind of damage is named, exit codes."""

import json
import shutil
import subprocess
import sys
import tarfile

import cv2
import numpy as np
import pytest

from data_prep import check, layouts
from data_prep.schema import encode_sample
from data_prep.writer import ShardWriter


def sample(i, h=5, w=7):
    raw = np.arange(h * w, dtype=np.uint16).reshape(h, w) * 100
    raw[0, 1] = 65535
    m = {"source": "t", "scene": "s", "frame": str(i), "width": w, "height": h,
         "fx": 1.0, "fy": 1.0, "cx": 1.0, "cy": 1.0, "depth_scale": 0.05}
    sky = np.zeros((h, w), bool)
    sky[0, 1] = True
    return encode_sample(f"t_s_{i}", np.zeros((h, w, 3), np.uint8), raw, m, sky=sky)


def write(folder, samples, max_samples=2):
    with ShardWriter(folder, max_samples=max_samples) as w:
        for s in samples:
            w.write(s)


def run(folder, capsys, *extra):
    rc = check.main([str(folder), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_good_folder(tmp_path, capsys):
    write(tmp_path, [sample(i) for i in range(5)])
    rc, out, _ = run(tmp_path, capsys)
    assert rc == 0
    for field in ("shards", "samples", "resolution", "depth p1/p5/p50/p95/p99", "beyond 80 m",
                  "sky", "no measurement"):
        assert field in out
    assert "7x5 (5)" in out
    assert "5 (5 valid, 0 problems)" in out
    table = {line[:24].strip(): line[24:].strip() for line in out.splitlines()}
    # 35 pixels: 1 sky (also 65535), 1 zero (no measurement), the rest n * 5 m
    assert table["sky"] == f"{100 * 1 / 35:.2f} %"
    assert table["raw 65535 (far)"] == f"{100 * 1 / 35:.2f} %"
    assert table["no measurement (0)"] == f"{100 * 1 / 35:.2f} %"
    beyond = sum(1 for n in range(2, 35) if n * 100 * 0.05 > 80)
    assert table["beyond 80 m (not sky)"] == f"{100 * beyond / 35:.2f} %"
    assert table["depth max (finite)"] == "170.00 m"


def test_quiet(tmp_path, capsys):
    write(tmp_path, [sample(0)])
    rc, out, _ = run(tmp_path, capsys, "--quiet")
    assert rc == 0 and out.strip() == "OK: 1 samples in 1 shards"


def test_missing_depth_and_bad_json(tmp_path, capsys):
    bad1 = sample(1)
    del bad1["depth.png"]
    bad2 = sample(2)
    bad2["meta.json"] = b"{not json"
    write(tmp_path, [sample(0), bad1, bad2, sample(3)])
    rc, out, err = run(tmp_path, capsys)
    assert rc == 1
    assert "shard-000000.tar: t_s_1: missing depth.png" in out
    assert "shard-000001.tar: t_s_2: meta.json is not valid JSON" in out
    assert "2 problem(s)" in err


def test_8bit_depth_named(tmp_path, capsys):
    s = sample(0)
    ok, buf = cv2.imencode(".png", np.zeros((5, 7), np.uint8))
    s["depth.png"] = buf.tobytes()
    write(tmp_path, [s])
    rc, out, _ = run(tmp_path, capsys)
    assert rc == 1 and "shard-000000.tar: t_s_0: depth.png is uint8, expected 16-bit" in out


def test_image_with_a_corrupt_huge_header_is_one_line(tmp_path, capsys):
    s = sample(1)
    s["rgb.png"] = layouts.png_declaring(100000, 100000)  # refused from its header, never decoded
    write(tmp_path, [sample(0), s, sample(2)])
    rc, out, err = run(tmp_path, capsys, "--quiet")
    assert rc == 1 and "1 problem(s)" in err and "Traceback" not in err
    [line] = [ln for ln in out.splitlines() if "t_s_1" in ln]
    assert line.startswith("shard-000000.tar: t_s_1: rgb.png header declares 100000x100000 but meta says ")


def test_truncated_mid_member(tmp_path, capsys):
    write(tmp_path, [sample(i) for i in range(2)], max_samples=10)
    p = tmp_path / "shard-000000.tar"
    data = p.read_bytes()
    p.write_bytes(data[: 512 * 9 + 100])  # inside the second sample
    rc, out, _ = run(tmp_path, capsys)
    assert rc == 1
    assert "shard-000000.tar: truncated" in out
    assert "index.json: says shard-000000.tar holds 2 samples" in out


def test_truncated_at_member_boundary(tmp_path, capsys):
    # Cut exactly after a complete member: tar readers see a shorter but "valid" archive.
    write(tmp_path, [sample(i) for i in range(2)], max_samples=10)
    p = tmp_path / "shard-000000.tar"
    with tarfile.open(p) as t:
        m = t.getmembers()[4]  # first member (of 4) of the second sample
    end = m.offset_data + -(-m.size // 512) * 512
    p.write_bytes(p.read_bytes()[:end])
    rc, out, _ = run(tmp_path, capsys)
    assert rc == 1
    assert "shard-000000.tar: truncated tar (no end-of-archive marker" in out
    assert "sample t_s_1 dropped as possibly incomplete" in out  # the partial sample is named


def test_duplicate_key_across_shards(tmp_path, capsys):
    write(tmp_path, [sample(0), sample(1)], max_samples=1)
    shutil.copyfile(tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar")
    rc, out, _ = run(tmp_path, capsys)
    assert rc == 1 and "shard-000001.tar: t_s_0: duplicate key (also in shard-000000.tar)" in out


def test_index_missing_or_wrong(tmp_path, capsys):
    write(tmp_path, [sample(0), sample(1)], max_samples=1)
    idx = json.loads((tmp_path / "index.json").read_text())
    idx["shards"].append({"name": "shard-000009.tar", "samples": 0})
    (tmp_path / "index.json").write_text(json.dumps(idx))
    rc, out, _ = run(tmp_path, capsys)
    assert rc == 1 and "index.json: lists shard-000009.tar, which is not in the folder" in out
    (tmp_path / "index.json").unlink()
    rc, out, _ = run(tmp_path, capsys)
    assert rc == 1 and "index.json:" in out and "no shard index" in out


def test_empty_folder_and_not_a_folder(tmp_path, capsys):
    rc, out, _ = run(tmp_path, capsys)
    assert rc == 1 and "no *.tar shards" in out
    rc, _, err = run(tmp_path / "nope", capsys)
    assert rc == 2 and "not a folder" in err


def test_cli_subprocess(tmp_path):
    write(tmp_path, [sample(0)])
    r = subprocess.run([sys.executable, "-m", "data_prep.check", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "samples" in r.stdout
    (tmp_path / "index.json").unlink()
    r = subprocess.run([sys.executable, "-m", "data_prep.check", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1


def test_progress_on_stderr_unless_quiet(tmp_path, capsys):
    write(tmp_path, [sample(i) for i in range(3)], max_samples=2)
    assert check.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "3/3" in err and "sample/s" in err  # against index.json's total: rate and ETA
    assert check.main([str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_depth_percentiles_stay_within_the_depths_seen():
    """The percentiles come from a log-spaced histogram's bin middles: a set whose every depth is
    15.00 m read 15.03 m for each percentile, above the maximum."""
    from data_prep.check import Stats
    from data_prep.schema import depth_to_raw

    stats = Stats()
    raw = depth_to_raw(np.full((4, 5), 15.0), 0.01)
    dec = {"depth_raw": raw, "depth": raw.astype(np.float32) * 0.01, "sky": np.zeros(raw.shape, bool),
           "meta": {"width": 5, "height": 4, "source": "t"}}
    stats.add(dec, "png")
    assert stats.percentiles([1, 50, 99]) == [pytest.approx(15.0)] * 3
    assert all(stats.dmin <= p <= stats.dmax for p in stats.percentiles([1, 50, 99]))


def test_json_nested_past_the_parsers_depth_is_one_line(tmp_path, capsys):
    """Python's parser gives up on very deep nesting with RecursionError, which no except caught:
    a traceback from the checker (and, for a sample, from a training loader)."""
    deep = b"[" * 100000 + b"]" * 100000
    bad = sample(1)
    bad["meta.json"] = deep
    write(tmp_path / "a", [sample(0), bad])
    rc, out, err = run(tmp_path / "a", capsys, "--quiet")
    assert rc == 1 and "t_s_1: meta.json is not valid JSON" in out and "Traceback" not in err
    write(tmp_path / "b", [sample(0)])
    (tmp_path / "b" / "index.json").write_bytes(deep)
    rc, out, err = run(tmp_path / "b", capsys, "--quiet")
    assert rc == 1 and "index.json: not valid JSON" in out + err and "Traceback" not in err


def test_depth_percentiles_count_depths_beyond_the_histogram(tmp_path, capsys):
    """Depths past 10 km (a coarse depth_scale allows them) were left out of the percentiles while
    the maximum counted them."""
    h, w = 4, 8
    raw = np.full((h, w), 30000, np.uint16)  # 15 km at 0.5 m per unit
    raw[0] = 20  # 10 m
    m = {"source": "t", "scene": "s", "frame": "0", "width": w, "height": h,
         "fx": 1.0, "fy": 1.0, "cx": 1.0, "cy": 1.0, "depth_scale": 0.5}
    write(tmp_path, [encode_sample("t_s_0", np.zeros((h, w, 3), np.uint8), raw, m)])
    rc, out, _ = run(tmp_path, capsys)
    line = next(x for x in out.splitlines() if "p50" in x)
    p1, p5, p50, p95, p99 = (float(v) for v in line.split("p99", 1)[1].rstrip(" m").split("/"))
    assert rc == 0 and p1 < 11 and p50 >= 9000 and p99 >= 9000, line
