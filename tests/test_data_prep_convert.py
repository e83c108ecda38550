"""Converter plumbing: bad input, --skip-bad, refusing a used folder, interrupted runs."""

import argparse
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from data_prep import check, convert, kitti, layouts, synthetic, vkitti2
from data_prep.writer import read_index

KITTI_IMG = f"{layouts.KITTI_DATE}/{layouts.KITTI_DRIVE}/image_02/data"
KITTI_GT = f"train/{layouts.KITTI_DRIVE}/proj_depth/groundtruth/image_02"


def kitti_main(raw, depth, out, *extra):
    return kitti.main(["--raw", str(raw), "--depth", str(depth), "--out", str(out),
                       "--workers", "1", "--no-progress", *extra])


def vkitti_main(root, out, *extra):
    return vkitti2.main(["--root", str(root), "--out", str(out), "--workers", "1", "--no-progress", *extra])


def assert_nothing_final(out):
    if out.exists():
        assert list(out.glob("*.tar")) == [] and not (out / "index.json").exists()
        assert [p for p in out.iterdir() if p.name.endswith(".tmp")] == []


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def kitti_src(fixtures_dir, tmp_path):
    return layouts.kitti_tree(fixtures_dir, tmp_path / "src")


def test_missing_file_stops_run(kitti_src, tmp_path, capsys):
    raw, depth = kitti_src
    missing = raw / KITTI_IMG / "0000000050.png"
    missing.unlink()
    out = tmp_path / "out"
    assert kitti_main(raw, depth, out) == 2
    err = one_line_error(capsys)
    assert f"{missing}: missing file" in err and "--skip-bad" in err
    assert_nothing_final(out)


def test_skip_bad_counts_and_lists(kitti_src, tmp_path, capsys):
    raw, depth = kitti_src
    missing = raw / KITTI_IMG / "0000000050.png"
    missing.unlink()
    corrupt = depth / KITTI_GT / "0000000100.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    assert kitti_main(raw, depth, out, "--skip-bad") == 0
    stdout = capsys.readouterr().out
    assert "wrote 1 samples" in stdout and "skipped 2 bad frame(s)" in stdout
    assert f"skipped: {missing}: missing file" in stdout
    assert f"skipped: {corrupt}: unreadable image" in stdout
    assert read_index(out)["total"] == 1
    assert check.main([str(out), "--quiet"]) == 0


def test_all_bad_with_skip_bad_fails(kitti_src, tmp_path, capsys):
    raw, depth = kitti_src
    (raw / layouts.KITTI_DATE / "calib_cam_to_cam.txt").unlink()
    out = tmp_path / "out"
    assert kitti_main(raw, depth, out, "--skip-bad") == 2
    err = one_line_error(capsys)
    assert "every frame was bad" in err and "calib_cam_to_cam.txt" in err  # and why
    assert_nothing_final(out)


def test_a_full_disk_is_one_line_and_leaves_nothing(kitti_src, tmp_path, capsys, monkeypatch):
    from data_prep.writer import ShardWriter

    raw, depth = kitti_src
    real_write = ShardWriter.write

    def write(self, sample):
        if self.total:
            raise OSError(28, "No space left on device")
        real_write(self, sample)
    monkeypatch.setattr(ShardWriter, "write", write)
    out = tmp_path / "out"
    assert kitti_main(raw, depth, out, "--shard-size", "1") == 2
    err = one_line_error(capsys)
    assert f"{out}: cannot write shards (No space left on device); no shards written" in err
    assert_nothing_final(out)


def test_8bit_depth_source_named(kitti_src, tmp_path, capsys):
    raw, depth = kitti_src
    p = depth / KITTI_GT / "0000000005.png"
    cv2.imwrite(str(p), np.zeros((375, 1242), np.uint8))
    assert kitti_main(raw, depth, tmp_path / "out") == 2
    assert f"error: {p}: depth PNG is uint8, expected 16-bit" in one_line_error(capsys)


def test_size_mismatch_named(tmp_path, capsys):
    root = layouts.vkitti2_tree(tmp_path / "src", scenes=("Scene01",), variations=("clone",), n_frames=2)
    p = root / "Scene01/clone/frames/depth/Camera_0/depth_00001.png"
    cv2.imwrite(str(p), np.ones((10, 10), np.uint16))
    assert vkitti_main(root, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert f"error: {p}: size 10x10 does not match rgb" in err
    assert_nothing_final(tmp_path / "out")


@pytest.mark.parametrize("damage", ["no file", "no row", "zero focal length"])
def test_missing_intrinsics_named(tmp_path, capsys, damage):
    root = layouts.vkitti2_tree(tmp_path / "src", scenes=("Scene01",), variations=("clone",), n_frames=2)
    p = root / "Scene01/clone/intrinsic.txt"
    if damage == "no file":
        p.unlink()
        expected = f"error: {p}: missing intrinsics file"
    elif damage == "zero focal length":
        lines = p.read_text().splitlines()
        lines[1] = " ".join(lines[1].split()[:2] + ["0"] + lines[1].split()[3:])
        p.write_text("\n".join(lines) + "\n")
        expected = f"error: {p}: line 2: intrinsics must be finite and positive"
    else:
        p.write_text("\n".join(p.read_text().splitlines()[:2]) + "\n")  # header + frame 0 camera 0
        expected = f"error: {p}: no intrinsics for frame 1 camera 0"
    assert vkitti_main(root, tmp_path / "out") == 2
    assert expected in one_line_error(capsys)


def test_refuses_folder_with_shards(kitti_src, tmp_path, capsys):
    raw, depth = kitti_src
    out = tmp_path / "out"
    assert kitti_main(raw, depth, out) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert kitti_main(raw, depth, out) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "already holds shards" in err and "--overwrite" in err
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert f"({len(tars)} shard(s), {tars[0]} first)" in err  # index.json is not a shard
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert kitti_main(raw, depth, out, "--overwrite", "--limit", "1") == 0
    assert read_index(out)["total"] == 1


def test_no_frames_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert vkitti_main(tmp_path / "empty", tmp_path / "out") == 2
    assert "no SceneXX" in one_line_error(capsys)
    assert vkitti_main(tmp_path / "nope", tmp_path / "out") == 2
    assert "not a folder" in one_line_error(capsys)


def _args(out, **kw):
    a = dict(out=out, workers=1, shard_size=1, shard_mb=300.0, prefix="shard", overwrite=False,
             skip_bad=False, limit=None, no_progress=True)
    a.update(kw)
    return argparse.Namespace(**a)


class _Interrupting:
    """A load that raises after ``n`` frames (used with --workers 1, so it runs in-process)."""

    def __init__(self, n, exc):
        self.n, self.exc, self.calls = n, exc, 0

    def __call__(self, frame, opts):
        self.calls += 1
        if self.calls > self.n:
            raise self.exc
        return synthetic.load(frame, opts)


OPTS = {"width": 32, "height": 16, "rgb_format": "png", "jpeg_quality": 95}


def test_ctrl_c_leaves_no_final_shard(tmp_path, capsys):
    out = tmp_path / "out"
    load = _Interrupting(3, KeyboardInterrupt())
    rc = convert.run("synthetic", synthetic.frames_for(0, 10), load, OPTS, _args(out))
    assert rc == 130 and load.calls == 4
    assert "interrupted" in capsys.readouterr().err
    assert_nothing_final(out)


def test_crash_leaves_no_final_shard(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        convert.run("synthetic", synthetic.frames_for(0, 10), _Interrupting(3, RuntimeError("boom")),
                    OPTS, _args(out))
    assert_nothing_final(out)


def _dies_on_frame_3(frame, opts):
    """A load whose worker is killed on one frame, as the OOM killer would."""
    if frame.params["index"] == 3:
        os._exit(137)
    return synthetic.load(frame, opts)


def test_a_dead_worker_ends_the_run_in_one_line_instead_of_hanging(tmp_path, capsys):
    out = tmp_path / "out"
    frames = synthetic.frames_for(0, 8)
    assert frames[3].params["index"] == 3
    rc = convert.run("synthetic", frames, _dies_on_frame_3, OPTS, _args(out, workers=2))
    assert rc == 2 and "a conversion worker died" in one_line_error(capsys)
    assert_nothing_final(out)


def _start_synthetic(out, frames):
    cmd = [sys.executable, "-m", "data_prep.synthetic", "--out", str(out), "--frames", str(frames),
           "--width", "48", "--height", "24", "--workers", "2", "--shard-size", "2", "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_shards(out, proc, n=2, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if out.exists() and len(list(out.glob("*.tar"))) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"generator ended early: {proc.communicate()}")
        time.sleep(0.02)
    pytest.fail("no shards appeared")


@pytest.mark.parametrize("signum,code,said", [
    (signal.SIGINT, 130, "interrupted"),
    # what SLURM, docker stop and kill send: the writer aborts as for Ctrl-C, exit 128 + 15
    (signal.SIGTERM, 128 + signal.SIGTERM, "terminated by SIGTERM"),
])
def test_signal_to_a_subprocess_with_workers(tmp_path, signum, code, said):
    out = tmp_path / "out"
    proc = _start_synthetic(out, 5000)
    try:
        _wait_for_shards(out, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert said in err
    assert_nothing_final(out)


def test_a_hangup_to_the_whole_process_group_cleans_up_quietly(tmp_path):
    """A closed terminal sends SIGHUP to every process of the group, multiprocessing's helpers
    too: the resource tracker died of it and its relaunched copy printed KeyError tracebacks."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.synthetic", "--out", str(out), "--frames", "5000", "--width", "48",
           "--height", "24", "--workers", "2", "--shard-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_shards(out, proc)
        os.killpg(proc.pid, signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert err.strip() == f"terminated by SIGHUP: removed the partial output in {out}", err
    assert_nothing_final(out)


@pytest.mark.slow
def test_sigkill_leaves_only_complete_shards(tmp_path, capsys):
    out = tmp_path / "out"
    proc = _start_synthetic(out, 5000)
    try:
        _wait_for_shards(out, proc, n=3)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)  # orphaned pool workers notice the dead parent and exit
    assert not (out / "index.json").exists()
    problems = []
    for shard in sorted(out.glob("*.tar")):
        n = sum(1 for _ in check.read_shard(shard, problems))
        assert n == 2
    assert problems == []  # every final-named shard is complete
    # a rerun refuses the folder; --overwrite replaces it
    assert synthetic.main(["--out", str(out), "--frames", "3", "--width", "32", "--height", "16",
                           "--workers", "1", "--no-progress"]) == 2
    assert synthetic.main(["--out", str(out), "--frames", "3", "--width", "32", "--height", "16",
                           "--workers", "1", "--no-progress", "--overwrite"]) == 0
    assert check.main([str(out), "--quiet"]) == 0
    assert [p for p in os.listdir(out) if p.endswith(".tmp")] == []


def test_frames_are_submitted_a_bounded_distance_ahead_of_the_writer():
    """Results come in order, and no more than `ahead` frames are ever encoded-and-waiting: a slow
    writer must not let every encoded frame of a data set pile up in memory."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()
    state = {"submitted": 0, "consumed": 0, "most_ahead": 0}

    def encode(i):
        with lock:
            state["most_ahead"] = max(state["most_ahead"], state["submitted"] - state["consumed"])
        return i * i

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, *args):
            with lock:
                state["submitted"] += 1
            return super().submit(fn, *args)

    with CountingPool(3) as pool:
        out = []
        for r in convert.bounded_map(pool, encode, range(50), ahead=5):
            time.sleep(0.001)  # the slow writer
            with lock:
                state["consumed"] += 1
            out.append(r)
    assert out == [i * i for i in range(50)]
    assert state["submitted"] == 50 and 1 <= state["most_ahead"] <= 5
    assert list(convert.bounded_map(ThreadPoolExecutor(1), encode, [], ahead=2)) == []


def test_image_opencv_refuses_by_raising_is_a_bad_frame(fixtures_dir, tmp_path, capsys):
    """A corrupt header that makes cv2.imdecode raise (not return None) is a bad frame like any other."""
    raw, depth = layouts.kitti_tree(fixtures_dir, tmp_path / "src", frames=(5, 50))
    huge = raw / KITTI_IMG / "0000000005.png"
    huge.write_bytes(layouts.png_declaring(100000, 100000))
    assert kitti_main(raw, depth, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert f"{huge}: unreadable image (" in err and "CV_IO_MAX_IMAGE_PIXELS" in err
    assert_nothing_final(tmp_path / "out")
    assert kitti_main(raw, depth, tmp_path / "out", "--skip-bad") == 0
    stdout = capsys.readouterr().out
    assert "wrote 1 samples" in stdout and f"skipped: {huge}: unreadable image (" in stdout


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "0.01"])
def test_shard_mb_must_be_finite_and_at_least_the_writers_minimum(kitti_src, tmp_path, capsys, value):
    raw, depth = kitti_src
    assert kitti_main(raw, depth, tmp_path / "out", "--shard-mb", value) == 2
    assert f"--shard-mb must be a finite number >= 0.0390625 (MiB, the smallest shard the writer makes), got " \
           f"{float(value)}" in one_line_error(capsys)
    assert_nothing_final(tmp_path / "out")


class _Signalling:
    """A load that sends this process ``signum`` on frame ``n`` (in-process, --workers 1)."""

    def __init__(self, n, signum):
        self.n, self.signum, self.calls = n, signum, 0

    def __call__(self, frame, opts):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), self.signum)
        return synthetic.load(frame, opts)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_take_the_ctrl_c_path(tmp_path, capsys, signum):
    out = tmp_path / "out"
    caught = []

    def callers_handler(*a):  # a signal that run() does not handle lands here, not in pytest
        caught.append(a)

    before = signal.signal(signum, callers_handler)
    try:
        load = _Signalling(4, signum)
        rc = convert.run("synthetic", synthetic.frames_for(0, 10), load, OPTS, _args(out))
        assert signal.getsignal(signum) is callers_handler  # put back afterwards
    finally:
        signal.signal(signum, before)
    assert caught == [] and rc == 128 + signum and load.calls == 4
    assert f"terminated by {signal.Signals(signum).name}: removed the partial output" in capsys.readouterr().err
    assert_nothing_final(out)
