"""Faults and bad input during training: nothing trained is lost, nothing hangs, every stop says why.

Fast tests run in `make test`; the multi-process and kill tests are marked slow (`make test-faults`).
The table of what survives what is docs/faults.md.
"""
import copy
import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import cv2
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import read_metrics, write_tiny_shards
from curriculum import module as module_mod
from curriculum import train as train_mod
from curriculum.checkpoint import AtomicCheckpointIO, CheckpointError, model_state, read_checkpoint
from curriculum.cli import main as cli_main
from curriculum.config import RECIPES_DIR, RecipeError, load_recipe, to_plain
from curriculum.data import DataError, StreamPositions, TrainSpec, TrainStream, ValStream, train_loader
from curriculum.faults import _PRIORITY, ReportingCheckpointIO, RunInterrupted, SignalCheckpoint
from curriculum.losses import compute_loss
from curriculum.masks import build_policy
from curriculum.model import DepthPrediction
from curriculum.module import NonFiniteError
from data_prep.schema import FAR_RAW, SampleError, decode_sample, depth_to_raw, encode_sample
from data_prep.writer import ShardWriter

TIMEOUT = 300


# ---------------------------------------------------------------------------- helpers


def _frame(kind: str, rng: np.random.Generator, h: int = 56, w: int = 112):
    """(rgb, raw depth, sky) of one synthetic frame: `normal` (a 150..5 m ramp under a sky band),
    `sky` (every pixel sky, raw 65535) or `far` (every pixel measured beyond 80 m)."""
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    sky = np.zeros((h, w), bool)
    if kind == "sky":
        sky[:] = True
        raw = np.full((h, w), FAR_RAW, np.uint16)
    elif kind == "far":
        raw = np.round(np.linspace(150.0, 100.0, h, dtype=np.float32)[:, None].repeat(w, 1) / 0.01).astype(np.uint16)
    else:
        rows = np.linspace(150.0, 5.0, h, dtype=np.float32)[:, None].repeat(w, 1) * (1.0 + 0.2 * rng.random())
        raw = np.round(rows / 0.01).astype(np.uint16)
        sky[: h // 4] = True
        raw[sky] = FAR_RAW
    return rgb, raw, sky


def _sample(key: str, kind: str, rng: np.random.Generator) -> dict:
    """A sample dict of the given kind; the bad kinds break exactly one thing of a good sample."""
    rgb, raw, sky = _frame(kind if kind in ("sky", "far") else "normal", rng)
    h, w = raw.shape
    meta = {"source": "test", "scene": "f", "frame": key, "width": w, "height": h,
            "fx": 100.0, "fy": 100.0, "cx": w / 2, "cy": h / 2, "depth_scale": 0.01}
    sample = encode_sample(key, rgb, raw, meta, sky=sky)
    if kind == "no_depth":
        del sample["depth.png"]
    elif kind == "bad_image":
        sample["rgb.png"] = b"\x89PNG\r\n\x1a\n" + bytes(40)
    elif kind == "bad_json":
        sample["meta.json"] = b'{"schema": 1, "source": '
    elif kind == "depth8":
        sample["depth.png"] = cv2.imencode(".png", (raw >> 8).astype(np.uint8))[1].tobytes()
    return sample


BAD_KINDS = {  # kind -> what the warning says
    "no_depth": "lacks depth.png",
    "bad_image": "cannot be decoded",
    "bad_json": "not valid JSON",
    "depth8": "expected 16-bit",
}


def _write_shards(folder: Path, layout: list[list[str]], seed: int = 0) -> list[str]:
    """One shard per entry of `layout`, holding samples of the listed kinds in that order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, kinds in enumerate(layout):
        sub = folder / f".w{i}"
        with ShardWriter(sub, prefix=f"shard{i:02d}", max_samples=len(kinds)) as writer:
            for j, kind in enumerate(kinds):
                writer.write(_sample(f"f{seed}_{i:02d}_{j:03d}_{kind.replace('_', '-')}", kind, rng))
        (src,) = sub.glob("*.tar")
        dst = folder / f"shard-{i:06d}.tar"
        os.replace(src, dst)
        names.append(dst)
        (sub / "index.json").unlink()
        sub.rmdir()
    index = {"schema": 1, "total": sum(len(k) for k in layout),
             "shards": [{"name": p.name, "samples": len(k), "bytes": p.stat().st_size} for p, k in zip(names, layout)]}
    (folder / "index.json").write_text(json.dumps(index))
    return [str(p) for p in names]


def _truncate(path: str, fraction: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def _overrides(train_dir, val_dir, out, *extra) -> list[str]:
    return [f"data.train_shards={train_dir}/*.tar", f"data.val_shards={val_dir}/*.tar", f"run.out_dir={out}", *extra]


def _recipe(train_dir, val_dir, out, *extra, files=("smoke.yaml",)):
    return load_recipe([RECIPES_DIR / f for f in files], _overrides(train_dir, val_dir, out, *extra))


def _column(rows: list[dict], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.endswith(lines[0]), err[-2000:]
    return lines[0]


class _Probe(pl.Callback):
    """Test hook inside a real run: snapshots weights after each step, runs `at_step` actions."""

    def __init__(self, at_step=None, on_setup=None):
        self.at_step = at_step or {}
        self.on_setup = on_setup
        self.weights: dict[int, dict] = {}
        self.trainer = None

    def setup(self, trainer, pl_module, stage):
        self.trainer = trainer
        if self.on_setup:
            self.on_setup(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        action = self.at_step.get(trainer.global_step)
        if action:
            action()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


@pytest.fixture
def probe(add_callback):
    """Appends a _Probe to the trainer of the next train() call; returns a factory."""
    return lambda **kw: add_callback(_Probe(**kw))


@contextmanager
def _no_hang(seconds: float):
    """Turns a hang into a test failure."""

    def alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- 2. bad data inside shards


def test_every_kind_of_bad_sample_is_skipped_counted_and_named(tmp_path):
    good = ["normal"] * 3
    shards = _write_shards(tmp_path / "d", [good + list(BAD_KINDS), good + ["normal"]])
    _truncate(shards[1], 0.6)  # cuts the second shard inside a member
    with pytest.warns(UserWarning) as record:
        keys = [k for b in ValStream(shards, 0, 1, 1, 28, 56) for k in b["key"]]
    messages = [str(w.message) for w in record if "skipping bad sample" in str(w.message)]
    for kind, reason in BAD_KINDS.items():
        assert any(shards[0] in m and reason in m and kind.replace("_", "-") in m for m in messages), (kind, messages)
    assert any(shards[1] in m and "unexpected end of data" in m for m in messages), messages
    assert all("normal" in k for k in keys) and len(keys) >= 3 + 1  # every good sample before the cut arrives
    # the counts travel with the batches
    batches = list(ValStream(shards, 0, 1, 2, 28, 56))
    assert sum(int(b["bad_samples"]) for b in batches) == len(messages)

    # training goes on past them: a full epoch of full batches
    spec = TrainSpec(batch_size=2, batches_per_rank=5, crop_height=28, crop_width=56, shuffle_buffer=1)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        train_batches = list(TrainStream(shards, spec, 0, 1, 0))
    assert len(train_batches) == 5 and all(len(b["key"]) == 2 for b in train_batches)
    assert sum(int(b["bad_samples"]) for b in train_batches) >= len(BAD_KINDS)


def test_bad_sample_limit_stops_the_stream_naming_the_shard(tmp_path):
    shards = _write_shards(tmp_path / "d", [["normal", "bad_json", "normal", "depth8"]])
    spec = TrainSpec(batch_size=1, batches_per_rank=4, crop_height=28, crop_width=56, shuffle_buffer=1,
                     max_bad_samples=1)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=rf"{shards[0]}: more than 1 bad samples"):
        list(TrainStream(shards, spec, 0, 1, 0))


# failed decodes draw a raw sample without making a crop
_DECODE_FAILURES = [["normal", "bad_json", "normal", "depth8", "normal", "bad_image", "normal", "normal"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_after_failed_decodes_sees_the_uninterrupted_batches(tmp_path, workers):
    """The stream positions of the trained batches (what a checkpoint keeps) make a resumed stream
    skip the samples that failed to decode too; a skip of one sample per trained sample (all a
    resume without positions can do) lands elsewhere."""
    shards = _write_shards(tmp_path / "d", _DECODE_FAILURES * 2)
    spec = TrainSpec(batch_size=2, batches_per_rank=6, crop_height=28, crop_width=56, shuffle_buffer=1,
                     color_jitter=0.2, scale_jitter=0.3)

    def run(step, resume_fn=lambda: None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(train_loader(TrainStream(shards, spec, 0, 1, 5), lambda: step, workers, resume_fn))

    full = run(0)
    assert sum(b["bad_samples"] for b in full[:3]) >= 2
    positions = StreamPositions(max(1, workers))
    for b in full[:3]:
        positions.note(b["stream_position"])
    resumed = run(3, positions.resume)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[3:]]
    assert all(torch.equal(a["packed"], b["packed"]) for a, b in zip(full[3:], resumed))  # augmentations too
    assert [b["stream_position"] for b in resumed] == [b["stream_position"] for b in full[3:]]
    assert [b["key"] for b in run(3)] != [b["key"] for b in full[3:]]
    # positions of another epoch, or of another step, are not this resume's
    assert [b["key"] for b in run(3, lambda: (1, positions.drawn))] == [b["key"] for b in run(3)]
    # a position short of the trained batches is one a resume without positions never learnt
    behind = [0] * len(positions.drawn)
    assert [b["key"] for b in run(3, lambda: (0, behind))] == [b["key"] for b in run(3)]


@pytest.mark.parametrize("epoch_samples,stop_epoch", [
    (0, 0),  # the index's 32 samples: 16 batches per epoch, the stop mid-epoch 0
    (6, 1),  # 3 batches per epoch: the stop one batch into epoch 1
    (8, 0),  # 4 batches per epoch: the stop at the end of epoch 0, whose positions no longer apply
])
def test_a_run_resumed_after_failed_decodes_ends_where_an_uninterrupted_one_does(tmp_path, probe, epoch_samples,
                                                                                 stop_epoch):
    """Two loader workers (two streams), failed decodes before the stop: the checkpoint keeps
    each stream's position and the rank's bad-sample count; the resumed run reaches the
    uninterrupted run's weights and count."""
    _write_shards(tmp_path / "train", _DECODE_FAILURES * 4)
    write_tiny_shards(tmp_path / "val", n_shards=1, per_shard=2, seed=1)
    common = ("stages.0.steps=3", "stages.1.steps=2", "data.num_workers=2", "data.shuffle_buffer=1",
              "data.color_jitter=0.2", f"data.epoch_samples={epoch_samples}")

    def train(out, *extra):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return train_mod.train(_recipe(tmp_path / "train", tmp_path / "val", tmp_path / out, *common, *extra))

    whole = train("whole")
    probe(at_step={3: lambda: os.kill(os.getpid(), signal.SIGINT)})
    with pytest.raises(RunInterrupted):
        train("run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    position = read_checkpoint(ckpt)["curriculum"]["data_position"]
    assert position["world_size"] == 1 and position["streams"] == 2 and position["epoch"] == [stop_epoch]
    assert position["bad_samples"][0] >= 2
    if stop_epoch == 0:
        assert sum(position["drawn"][0]) > 4 * 2  # 4 batches of 2 and the failed decodes
    resumed = train("resumed", f"resume={ckpt}")
    assert resumed["global_step"] == whole["global_step"] == 5
    final = [read_checkpoint(r["checkpoint"]) for r in (whole, resumed)]
    assert _same_weights(model_state(final[0]), model_state(final[1]))
    assert final[0]["curriculum"]["bad_samples"] == final[1]["curriculum"]["bad_samples"]
    assert final[0]["curriculum"]["data_position"] == final[1]["curriculum"]["data_position"]


def test_ranks_gather_their_positions_on_the_strategys_device(monkeypatch):
    """After fit Lightning moves the module to the CPU while NCCL (GPU DDP) gathers only device
    tensors: the final checkpoint's gather must use the strategy's device, not the module's."""
    from types import SimpleNamespace

    from curriculum.module import DepthModule

    module = DepthModule(load_recipe([RECIPES_DIR / "smoke.yaml"], []))
    module._trainer = SimpleNamespace(world_size=2, datamodule=None,
                                      strategy=SimpleNamespace(root_device=torch.device("meta")))
    module.bad_samples = 3
    module.stream_positions.note((0, 0, 9))
    devices = []

    def gather(t):
        devices.append(t.device)
        return torch.stack([torch.tensor([3, 0, 9, 0]), torch.tensor([1, 0, 8, 0])])  # last: data-error flags

    monkeypatch.setattr(module, "_gather", gather)
    position = module._data_position()
    assert devices == [torch.device("meta")]
    assert position["bad_samples"] == [3, 1] and position["drawn"] == [[9], [8]] and position["world_size"] == 2


@pytest.fixture(scope="module")
def failure_shards(tmp_path_factory):
    """Four shards whose failed decodes fall at different places (one shard has none), and a
    sample the reader drops (no depth.png: never a raw sample, counted all the same)."""
    kinds = [["normal", "bad_json", "normal", "depth8", "normal", "normal"],
             ["bad_image", "normal", "no_depth", "normal", "bad_json", "normal"],
             ["normal"] * 6,
             ["depth8", "bad_json", "normal", "normal", "normal", "bad_image"]]
    return _write_shards(tmp_path_factory.mktemp("failures"), kinds)


def _worker_batches(stream: TrainStream, workers: int, monkeypatch) -> list[list[dict]]:
    """What each of `workers` loader workers yields from the stream, read in this process."""
    from types import SimpleNamespace

    from curriculum import data as data_mod

    out = []
    for wid in range(workers):
        monkeypatch.setattr(data_mod, "get_worker_info", lambda: SimpleNamespace(id=wid, num_workers=workers))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(list(copy.copy(stream)))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=st.integers(1, 3), batch_size=st.integers(1, 3), batches_per_rank=st.integers(2, 5),
       stop=st.integers(1, 9), world=st.sampled_from([(0, 1), (1, 2)]), seed=st.integers(0, 3))
def test_resume_at_any_step_with_any_workers_sees_the_uninterrupted_batches(
        failure_shards, monkeypatch, workers, batch_size, batches_per_rank, stop, world, seed):
    """Property: for any worker count, batch size, epoch length, rank and stop step, the
    positions of the batches trained before the stop make the resumed streams yield exactly the
    rest of the uninterrupted epoch. Batches arrive round-robin over the workers, as from a
    DataLoader; a resumed worker j plays stream (j + stop) % workers."""
    rank, world_size = world
    if len(failure_shards) < world_size * workers:
        return  # every reader needs a shard (check_readers refuses the run)
    spec = TrainSpec(batch_size=batch_size, batches_per_rank=batches_per_rank, crop_height=28, crop_width=56,
                     shuffle_buffer=2, color_jitter=0.1)
    stream = TrainStream(failure_shards, spec, rank, world_size, seed)
    epoch, skip = divmod(stop, batches_per_rank)
    stream.set_position(epoch * batches_per_rank)
    per_worker = _worker_batches(stream, workers, monkeypatch)
    whole = [per_worker[k % workers][k // workers] for k in range(batches_per_rank)]  # the DataLoader's order
    positions = StreamPositions(workers)
    if epoch:
        positions.note((epoch - 1, 0, 5))  # the last epoch's positions must not leak into this one
    for b in whole[:skip]:
        positions.note(b["stream_position"])
    stream.set_position(stop, positions.resume())
    per_worker = _worker_batches(stream, workers, monkeypatch)
    resumed = [per_worker[k % workers][k // workers] for k in range(batches_per_rank - skip)]
    assert [b["key"] for b in resumed] == [b["key"] for b in whole[skip:]]
    assert all(torch.equal(a["packed"], b["packed"]) for a, b in zip(resumed, whole[skip:]))
    # each bad sample counted once: the resumed batches count what the uninterrupted ones did
    assert [b["bad_samples"] for b in resumed] == [b["bad_samples"] for b in whole[skip:]]


def test_stream_positions_start_again_each_epoch():
    positions = StreamPositions(2)
    positions.note((0, 1, 5))
    positions.note((0, 0, 7))
    assert positions.resume() == (0, [7, 5])
    positions.note((1, 1, 2))
    assert positions.resume() == (1, [0, 2])
    with pytest.raises(ValueError, match="3 stream positions for 2 streams"):
        StreamPositions(2, 0, [1, 2, 3])


def test_nan_and_inf_depth_from_a_converted_source():
    """Conversion refuses NaN naming the source and keeps +inf as the far value (65535); in a
    batch, NaN and inf depth are no measurement or far, and the loss and gradients stay finite."""
    depth = np.full((4, 6), 10.0)
    depth[0, 0] = np.nan
    with pytest.raises(SampleError, match=r"scene7/depth_0001.exr: depth has 1 NaN"):
        depth_to_raw(depth, 0.01, name="scene7/depth_0001.exr")
    depth[0, 0] = np.inf
    raw = depth_to_raw(depth, 0.01, name="x")
    assert raw[0, 0] == FAR_RAW and raw[1, 1] == 1000
    meta = {"source": "t", "scene": "s", "frame": 0, "width": 6, "height": 4, "fx": 1.0, "fy": 1.0, "cx": 3.0,
            "cy": 2.0, "depth_scale": 0.01}
    decoded = decode_sample(encode_sample("t_s_0", np.zeros((4, 6, 3), np.uint8), raw, meta))
    assert np.isposinf(decoded["depth"][0, 0]) and decoded["depth"][1, 1] == pytest.approx(10.0)

    batch_depth = torch.full((2, 8, 8), 20.0)
    batch_depth[0, :2] = float("nan")
    batch_depth[0, 2:4] = float("inf")
    batch_depth[1] = float("nan")  # a crop with no usable pixel at all
    for spec in ({"name": "unclipped"}, {"name": "max_depth", "max_depth": 80.0}):
        weight, target = build_policy(spec)(batch_depth, torch.zeros(2, 8, 8, dtype=torch.bool),
                                            torch.isnan(batch_depth))
        pred = torch.full((2, 8, 8), 15.0, requires_grad=True)
        loss = compute_loss(DepthPrediction(depth=pred, uncertainty=None), target, weight)["loss"]
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all(), spec


def test_training_run_skips_bad_samples_and_logs_the_count(tmp_path):
    layout = [["bad_json", "normal", "depth8", "normal", "no_depth", "normal", "bad_image", "normal"]] * 2
    shards = _write_shards(tmp_path / "train", layout)
    _truncate(shards[1], 0.6)
    write_tiny_shards(tmp_path / "val", n_shards=1, per_shard=2, seed=1)
    cfg = _recipe(tmp_path / "train", tmp_path / "val", tmp_path / "run", "stages.0.steps=1", "stages.1.steps=1",
                  "data.shuffle_buffer=1")
    with pytest.warns(UserWarning, match="skipping bad sample"):
        result = train_mod.train(cfg)
    assert result["global_step"] == 2
    logged = _column(read_metrics(tmp_path / "run"), "train/bad_samples")
    assert len(logged) == 2 and logged == sorted(logged) and logged[-1] >= 2  # cumulative, never silent


@pytest.mark.parametrize("workers", [0, 1])  # 1: torch re-raises a worker's error wrapped in its traceback
def test_too_many_bad_samples_end_the_cli_run_in_one_line_naming_the_shard(tmp_path, capsys, workers):
    _write_shards(tmp_path / "train", [["normal", "depth8", "normal", "normal"]] * 2)
    write_tiny_shards(tmp_path / "val", n_shards=1, per_shard=2, seed=1)
    rc = cli_main(["train", str(RECIPES_DIR / "smoke.yaml"),
                   *_overrides(tmp_path / "train", tmp_path / "val", tmp_path / "run", "stages.0.steps=2",
                               "stages.1.steps=1", "data.max_bad_samples=0", "data.shuffle_buffer=1",
                               f"data.num_workers={workers}")])
    line = _one_line_error(capsys)
    assert rc == 2
    assert str(tmp_path / "train" / "shard-") in line and ".tar: more than 0 bad samples" in line
    assert "expected 16-bit" in line
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_ddp_ranks_data_error_becomes_empty_batches_carrying_it(tmp_path, monkeypatch):
    """Under DDP a rank whose stream fails goes on with batches that train nothing (zero weight
    under every policy), each carrying the error, so that the ranks stop together; on one
    process the error is raised at once, as before."""
    from curriculum import data as data_mod

    _write_shards(tmp_path / "train", [["normal"] * 4] * 2)
    urls = sorted(str(p) for p in (tmp_path / "train").glob("*.tar"))
    spec = TrainSpec(batch_size=2, batches_per_rank=4, crop_height=14, crop_width=28)

    real_iter = TrainStream.__iter__

    def fails_after_one_batch(self):
        yield from list(real_iter(self))[:1]
        raise DataError("shard-x.tar: more than 0 bad samples in this reader")

    monkeypatch.setattr(data_mod.TrainStream, "__iter__", fails_after_one_batch)
    ddp = iter(train_loader(TrainStream(urls, spec, 1, 2, seed=0), lambda: 0, 0))
    assert "data_error" not in next(ddp)
    for _ in range(2):
        batch = data_mod.unpack_batch(next(ddp))
        assert batch["data_error"] == "shard-x.tar: more than 0 bad samples in this reader"
        assert batch["image"].shape == (2, 3, 14, 28) and batch["bad_samples"] == 0
        depth, no_measurement = data_mod.depth_to_metres(batch["depth_raw"], batch["depth_scale"])
        sky = data_mod.unpack_mask(batch["sky_bits"], 28)
        for policy in ({"name": "unclipped"}, {"name": "max_depth"}, {"name": "mixed"}):
            weight, _ = build_policy(policy)(depth, sky, no_measurement)
            assert not weight.any(), policy
    alone = iter(train_loader(TrainStream(urls, spec, 0, 1, seed=0), lambda: 0, 0))
    next(alone)
    with pytest.raises(DataError, match="shard-x.tar"):
        next(alone)


def test_an_unreadable_shard_on_a_ddp_rank_becomes_empty_batches_too(tmp_path):
    _write_shards(tmp_path / "train", [["normal"] * 4])
    urls = [str(tmp_path / "train" / "shard-000000.tar"), str(tmp_path / "train" / "gone.tar")]
    spec = TrainSpec(batch_size=2, batches_per_rank=4, crop_height=14, crop_width=28, shuffle_buffer=1)
    batches = iter(train_loader(TrainStream(urls, spec, 1, 2, seed=0), lambda: 0, 0))
    errors = [next(batches).get("data_error") for _ in range(4)]
    assert errors[-1] and "gone.tar" in errors[-1] and "\n" not in errors[-1]


def test_a_checkpoint_after_a_ranks_data_error_is_refused_on_every_rank(tiny_shards):
    """On GPUs the ranks agree on a stop a step late, so a periodic save can come first: the
    positions gather carries each rank's data-error flag and every rank stops there, no file."""
    cfg = load_recipe([RECIPES_DIR / "smoke.yaml"], [])
    module = module_mod.DepthModule(to_plain(cfg))
    layout = {"world_size": 2, "streams": 1, "batch_size": 2, "batches_per_rank": 4}
    module._data_layout = lambda: layout

    class Trainer:
        global_rank, global_step = 0, 0

        class strategy:
            root_device = torch.device("cpu")

    object.__setattr__(module, "_trainer", Trainer())
    for mine, theirs, message in [(None, 1, "rank 0 stopped at step 0: another rank's training data failed"),
                                  ("x.tar: more than 0 bad samples", 0, "^x.tar: more than 0 bad samples$")]:
        module.data_error = mine
        module._gather = lambda t, theirs=theirs: torch.stack([t, torch.tensor([0, -1, 0, theirs])])
        with pytest.raises(DataError, match=message):
            module._data_position()
    module.data_error = None
    module._gather = lambda t: torch.stack([t, torch.tensor([0, -1, 0, 0])])
    assert module._data_position()["drawn"] == [[0], [0]]


def test_a_worker_s_wrapped_error_reads_as_its_own_line():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\n    raise DataError(m)\ncurriculum.data.DataError: a.tar: more than 1 bad samples")
    assert str(DataError(wrapped)) == "a.tar: more than 1 bad samples"
    assert str(DataError("plain: message")) == "plain: message"


def test_ranks_stop_together_on_a_data_error_naming_it_where_it_happened(tmp_path, monkeypatch):
    """The rank whose batch carries the error raises it; the others, told by the agreement, raise
    a line pointing at it; nobody saves a checkpoint."""
    from curriculum import faults

    class FakeTrainer:
        world_size, global_rank, global_step = 2, 1, 7

        class strategy:
            root_device = torch.device("cpu")

        def save_checkpoint(self, *a, **k):
            raise AssertionError("no checkpoint at a data error")

    monkeypatch.setattr(faults, "_distributed", lambda trainer: True)
    agreed = []
    monkeypatch.setattr(faults.dist, "all_reduce", lambda t, op=None: t.fill_(max([int(t.item()), *agreed])))
    failing, other = SignalCheckpoint(tmp_path / "a.ckpt"), SignalCheckpoint(tmp_path / "b.ckpt")
    for cb in (failing, other):
        cb.setup(FakeTrainer(), None, "fit")
    try:
        other.on_train_batch_end(FakeTrainer(), None, None, {"key": ["a"]}, 0)  # nothing agreed yet
        with pytest.raises(DataError, match=r"^shard-x.tar: more than 0 bad samples$"):
            failing.on_train_batch_end(FakeTrainer(), None, None, {"data_error": "shard-x.tar: more than 0 bad samples"}, 0)
        agreed.append(faults._DATA_ERROR)  # what the failing rank's flag makes of the all-reduce
        with pytest.raises(DataError, match=r"^rank 1 stopped after step 7: another rank's training data failed"):
            other.on_train_batch_end(FakeTrainer(), None, None, {"key": ["a"]}, 0)
    finally:
        for cb in (failing, other):
            cb.on_exception(FakeTrainer(), None, RuntimeError())
    assert not list(tmp_path.glob("*.ckpt"))


def test_a_ddp_ranks_validation_data_error_ends_its_validation_and_is_kept(tmp_path):
    """Under DDP a rank whose validation shard fails stops validating (the module's epoch-end
    all-reduce then stops every rank with the error); on one process the error is raised."""
    from curriculum.data import val_loader

    _write_shards(tmp_path / "val", [["normal"] * 2, ["bad_json"] * 3 + ["normal"]])
    urls = sorted(str(p) for p in (tmp_path / "val").glob("*.tar"))
    ranks = [ValStream(urls, rank, 2, 1, 14, 28, max_bad_samples=1) for rank in range(2)]
    batches = [list(val_loader(stream, 0)) for stream in ranks]
    assert len(batches[0]) == 2 and ranks[0].data_error is None
    assert batches[1] == [] and "shard-000001.tar: more than 1 bad samples" in ranks[1].data_error
    with pytest.raises(DataError, match="more than 1 bad samples"):
        list(val_loader(ValStream(urls, 0, 1, 1, 14, 28, max_bad_samples=1), 0))


@pytest.mark.slow
@pytest.mark.parametrize("seed,failing_rank,workers", [(0, 1, 0), (6, 0, 1)])  # 1: the error crosses from a worker
def test_a_bad_shard_on_any_ddp_rank_ends_every_rank_in_one_line(tmp_path, seed, failing_rank, workers):
    """Two processes (gloo): the bad shard's rank prints its one-line error, the other rank one
    line pointing at it, both exit 2 after the same step (a rank other than 0 failing used to
    leave rank 0 dying in the gradient all-reduce with a long traceback; on NCCL, a hang)."""
    _write_shards(tmp_path / "train", [["normal"] * 8] * 3 + [["bad_json"] * 4 + ["normal"] * 4])
    write_tiny_shards(tmp_path / "val", n_shards=2, per_shard=2, seed=1)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "curriculum.cli", "train", str(RECIPES_DIR / "smoke.yaml"),
                           *_overrides(tmp_path / "train", tmp_path / "val", tmp_path / "run", "data.max_bad_samples=1",
                                       "trainer.devices=2", "trainer.strategy=ddp", f"run.seed={seed}",
                                       f"data.num_workers={workers}", "logging.mode=disabled")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert any("shard-000003.tar: more than 1 bad samples in this reader" in e for e in errors)
    assert any(f"rank {1 - failing_rank} stopped after step" in e and "another rank's training data failed" in e
               for e in errors)


@pytest.mark.slow
def test_a_bad_validation_shard_on_one_ddp_rank_ends_every_rank_in_one_line(tmp_path):
    _write_shards(tmp_path / "train", [["normal"] * 8] * 2)
    _write_shards(tmp_path / "val", [["normal"] * 2, ["bad_json"] * 3 + ["normal"]])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "curriculum.cli", "train", str(RECIPES_DIR / "smoke.yaml"),
                           *_overrides(tmp_path / "train", tmp_path / "val", tmp_path / "run", "data.max_bad_samples=1",
                                       "trainer.devices=2", "trainer.strategy=ddp", "trainer.val_every_steps=2",
                                       "logging.mode=disabled")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert any("shard-000001.tar: more than 1 bad samples in this reader" in e for e in errors)
    assert any("rank 0 stopped validating at step 2: another rank's validation data failed" in e for e in errors)


# ---------------------------------------------------------------------------- 3. non-finite loss


def _nan_loss_at(monkeypatch, steps: set[int], holder: dict):
    original = module_mod.compute_loss

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        trainer = holder.get("trainer")
        if trainer is not None and trainer.global_step in steps:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(module_mod, "compute_loss", patched)


def test_nonfinite_steps_are_skipped_counted_and_k_in_a_row_stop_with_the_last_good_weights(
        tiny_shards, tmp_path, monkeypatch, probe):
    train_dir, val_dir, _, _ = tiny_shards
    holder = {}

    def k_is_two(trainer, module):
        holder["trainer"] = trainer
        module.max_nonfinite = 2

    p = probe(on_setup=k_is_two)
    _nan_loss_at(monkeypatch, {1, 3, 4}, holder)  # step 2 is good and resets the streak
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps with non-finite loss or gradients") as err:
        train_mod.train(_recipe(train_dir, val_dir, out, "stages.0.steps=3", "stages.1.steps=3"))
    stop = out / "checkpoints" / "nonfinite-stop.ckpt"
    assert str(stop) in str(err.value)
    # Lightning counts a skipped step as taken: weights after step k are p.weights[k + 1]
    assert _same_weights(p.weights[2], p.weights[1])  # step 1 skipped: weights unchanged
    assert not _same_weights(p.weights[3], p.weights[2])  # step 2 trained
    assert _same_weights(p.weights[4], p.weights[3])  # step 3 skipped
    ckpt = read_checkpoint(stop)
    assert _same_weights(model_state(ckpt), p.weights[3])  # the last good state, before steps 3 and 4
    # saved inside step 4, which a resume runs again: its batch is not counted as read, nor its skip
    assert ckpt["global_step"] == 4 and ckpt["curriculum"]["skipped_steps"] == 2
    assert ckpt["curriculum"]["data_position"]["drawn"] == [[2 * ckpt["global_step"]]]
    # logged with the step that follows the skip
    assert {int(r["step"]): float(r["train/skipped_steps"]) for r in read_metrics(out)
            if r.get("train/skipped_steps")}[3] >= 1
    # resumed, step 4 is skipped again (once more in a row is within the limit) and counted once
    resumed = train_mod.train(_recipe(train_dir, val_dir, tmp_path / "resumed", "stages.0.steps=3",
                                      "stages.1.steps=3", f"resume={stop}"))
    assert resumed["global_step"] == 6
    assert read_checkpoint(resumed["checkpoint"])["curriculum"]["skipped_steps"] == 3  # steps 1, 3 and 4


def test_weights_that_predict_nan_are_skipped_logged_and_never_saved_as_good(tiny_shards, tmp_path, probe,
                                                                             monkeypatch):
    """Finite weights whose prediction is NaN (an update too large for the network): each step is
    skipped and counted (its terms alone gave a loss of 0, logged as a perfect fit), and the stop
    saves no 'last good weights'."""
    from curriculum.model import DepthModel, DepthPrediction

    train_dir, val_dir, _, _ = tiny_shards
    original, broken = DepthModel.forward, {"now": False}

    def forward(self, x):
        out = original(self, x)
        return DepthPrediction(out.depth * float("nan"), out.uncertainty) if broken["now"] else out

    monkeypatch.setattr(DepthModel, "forward", forward)
    probe(on_setup=lambda trainer, module: setattr(module, "max_nonfinite", 2),
          at_step={1: lambda: broken.update(now=True)})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps .* at step 2; the weights predict non-finite "
                                             r"depth, so no checkpoint was saved"):
        train_mod.train(_recipe(train_dir, val_dir, out, "stages.0.steps=3", "stages.1.steps=3"))
    assert not (out / "checkpoints" / "nonfinite-stop.ckpt").exists()
    rows = {int(r["step"]): r for r in read_metrics(out) if r.get("train/silog")}
    assert float(rows[1]["train/nonfinite_prediction"]) == 0.0 and math.isfinite(float(rows[1]["train/loss"]))
    assert float(rows[2]["train/nonfinite_prediction"]) == 1.0 and math.isnan(float(rows[2]["train/loss"]))


def test_nonfinite_weights_are_never_saved_as_the_last_good_ones(tiny_shards, tmp_path, probe):
    """Skipped steps keep the weights; weights that are non-finite all the same (an update made them
    so) give a stop without a 'good' checkpoint."""
    train_dir, val_dir, _, _ = tiny_shards
    holder = {}

    def setup(trainer, module):
        holder["module"] = module
        module.max_nonfinite = 2

    def poison():
        with torch.no_grad():
            next(holder["module"].parameters()).fill_(float("nan"))

    probe(on_setup=setup, at_step={2: poison})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"the weights themselves are non-finite, so no checkpoint was saved"):
        train_mod.train(_recipe(train_dir, val_dir, out, "stages.0.steps=3", "stages.1.steps=3"))
    assert not (out / "checkpoints" / "nonfinite-stop.ckpt").exists()


# ---------------------------------------------------------------------------- 4. signals (in process)


def test_sigint_mid_stage_saves_a_checkpoint_and_stops_with_a_resume_hint(tiny_shards, tmp_path, probe, capsys):
    train_dir, val_dir, _, _ = tiny_shards
    before = signal.getsignal(signal.SIGINT)
    probe(at_step={1: lambda: os.kill(os.getpid(), signal.SIGINT)})
    out = tmp_path / "run"
    common = ("stages.0.steps=2", "stages.1.steps=1")
    with pytest.raises(RunInterrupted) as err:
        train_mod.train(_recipe(train_dir, val_dir, out, *common))
    ckpt_path = out / "checkpoints" / "last.ckpt"
    assert err.value.code == 128 + signal.SIGINT and err.value.step == 2
    assert "interrupted at step 2 by SIGINT" in str(err.value) and f"resume={ckpt_path}" in str(err.value)
    assert str(err.value) in capsys.readouterr().err
    assert read_checkpoint(ckpt_path)["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert not (out / "summary").exists()  # an interrupted run does not report itself complete

    resumed = train_mod.train(_recipe(train_dir, val_dir, tmp_path / "resumed", *common, f"resume={ckpt_path}"))
    assert resumed["global_step"] == 3 and resumed["switches"] == [(0, "pretrain"), (2, "finetune")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_the_final_validation_stops_with_its_status(tiny_shards, tmp_path, add_callback, capsys,
                                                                    monkeypatch, signum):
    """After the last step the run validates outside fit. A stop signal there ends the run with
    128 + signal and a resume hint (Lightning's handling exited 0 on SIGTERM, as if the run had
    finished, and SIGUSR1 killed it); SIGUSR1 requeues under SLURM. The resume validates the
    final step and finishes."""
    train_dir, val_dir, _, _ = tiny_shards
    calls = tmp_path / "scontrol-calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    class SignalAtFinalValidation(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if trainer.state.fn == "validate":
                os.kill(os.getpid(), signum)

    add_callback(SignalAtFinalValidation())
    out = tmp_path / "run"
    common = ("stages.0.steps=2", "stages.1.steps=1", "trainer.val_every_steps=0")
    with pytest.raises(RunInterrupted) as err:
        train_mod.train(_recipe(train_dir, val_dir, out, *common))
    ckpt = out / "checkpoints" / "last.ckpt"
    name = signal.Signals(signum).name
    assert err.value.code == 128 + signum and err.value.step == 3
    assert f"interrupted by {name} during the final validation (step 3); every step is in {ckpt}; resume with " \
           f"resume={ckpt}" in capsys.readouterr().err
    assert ("SLURM job requeued" in str(err.value)) == (signum == signal.SIGUSR1)
    if signum == signal.SIGUSR1:
        assert calls.read_text().split() == ["requeue", "4242"]
    else:
        assert not calls.exists()
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    assert read_checkpoint(ckpt)["global_step"] == 3 and not (out / "summary").exists()
    assert 3 not in [int(r["step"]) for r in read_metrics(out) if r.get("val/phantom_rate")]

    monkeypatch.setattr(SignalAtFinalValidation, "on_validation_batch_start", lambda *a, **k: None)
    resumed = train_mod.train(_recipe(train_dir, val_dir, out, *common, f"resume={ckpt}"))
    assert resumed["global_step"] == 3 and (out / "summary" / "rank0.json").is_file()
    assert [int(r["step"]) for r in read_metrics(out) if r.get("val/phantom_rate")] == [3]


@pytest.mark.parametrize("val_every,said", [(3, "training steps done; final validation skipped"),
                                             (8, "training steps and their final validation done")])
def test_a_signal_between_fit_and_the_final_save_waits_for_the_save(tiny_shards, tmp_path, add_callback, capsys,
                                                                    val_every, said):
    """Fit's teardown (loader shutdown) and the final save of a large model take seconds: a stop
    signal then met the default handlers, which ended the process without the final checkpoint
    (steps since the last periodic save lost, no message). It now waits for the save, then stops
    the run before the final validation, with the handlers given back."""
    train_dir, val_dir, _, _ = tiny_shards
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    class SignalAtTeardown(pl.Callback):
        def teardown(self, trainer, pl_module, stage):
            if stage == "fit":
                os.kill(os.getpid(), signal.SIGTERM)

    add_callback(SignalAtTeardown())
    out = tmp_path / "run"
    common = ("stages.0.steps=4", "stages.1.steps=4", f"trainer.val_every_steps={val_every}",
              "trainer.ckpt_every_steps=3")
    with pytest.raises(RunInterrupted) as err:
        train_mod.train(_recipe(train_dir, val_dir, out, *common))
    ckpt = out / "checkpoints" / "last.ckpt"
    assert err.value.code == 128 + signal.SIGTERM and err.value.step == 8
    assert read_checkpoint(ckpt)["global_step"] == 8  # not the periodic save of step 6
    assert f"interrupted at step 8 by SIGTERM ({said}); checkpoint saved to {ckpt}" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before
    assert not list((out / "checkpoints").glob(".*tmp*"))


def test_a_signal_during_a_last_step_validation_says_it_finished(tiny_shards, tmp_path, add_callback, capsys):
    """A validation scheduled at the last step runs inside fit; a signal during it is taken at
    fit's end, when that validation has finished and been logged: the line says so."""
    train_dir, val_dir, _, _ = tiny_shards

    class SignalInLastValidation(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if trainer.global_step == 4 and batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    add_callback(SignalInLastValidation())
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        train_mod.train(_recipe(train_dir, val_dir, out, "stages.0.steps=2", "stages.1.steps=2",
                                "trainer.val_every_steps=2"))
    assert "(training steps and their final validation done)" in capsys.readouterr().err
    assert [int(r["step"]) for r in read_metrics(out) if r.get("val/phantom_rate")] == [2, 4]


def test_resume_in_the_same_folder_continues_its_metrics_and_lineage(tiny_shards, tmp_path, probe):
    """The requeue flow: resume= into the run's own folder. metrics.csv keeps the rows of the steps
    before the checkpoint and gets the rest once; a stage-2 run keeps its link to stage 1; a
    checkpoint of another model is refused before any step."""
    train_dir, val_dir, _, _ = tiny_shards
    pre = train_mod.train(_recipe(train_dir, val_dir, tmp_path / "pre", "stages.0.steps=1", "logging.group=exp",
                                  files=("smoke.yaml", "pretrain.yaml")))
    out = tmp_path / "fine"
    common = ("stages.0.steps=4", "trainer.log_every_steps=1", "trainer.val_every_steps=0")
    probe(at_step={2: lambda: os.kill(os.getpid(), signal.SIGINT)})
    with pytest.raises(RunInterrupted):
        train_mod.train(_recipe(train_dir, val_dir, out, *common, f"init_from={pre['checkpoint']}",
                                files=("smoke.yaml", "finetune.yaml")))
    ckpt_path = out / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt_path)["global_step"] == 3
    # the step the run stopped after is in the checkpoint, and its row is written before the exit
    assert sorted(int(r["step"]) for r in read_metrics(out) if r.get("train/loss")) == [1, 2, 3]

    with pytest.raises(CheckpointError, match=r"resume '.*last.ckpt': model mismatch \(head: 'log' in checkpoint"):
        train_mod.train(_recipe(train_dir, val_dir, out, *common, f"resume={ckpt_path}", "model.head=sigmoid",
                                files=("smoke.yaml", "finetune.yaml")))
    resumed = train_mod.train(_recipe(train_dir, val_dir, out, *common, f"resume={ckpt_path}",
                                      files=("smoke.yaml", "finetune.yaml")))
    assert resumed["global_step"] == 4
    assert sorted(int(r["step"]) for r in read_metrics(out) if r.get("train/loss")) == [1, 2, 3, 4]  # no gap
    meta = read_checkpoint(resumed["checkpoint"])["curriculum"]
    assert meta["init_from"] == pre["checkpoint"] and meta["parent_stage"] == "pretrain"
    assert meta["recipe"]["logging"]["parent_checkpoint_sha256"] == meta["init_from_sha256"]
    assert meta["recipe"]["logging"]["group"] == "exp"  # stage 2 joins stage 1's W&B group


def test_a_hangup_stops_with_a_checkpoint_unless_it_is_ignored(tiny_shards, tmp_path, probe, capsys):
    """A closed terminal (a dropped ssh session) sends SIGHUP: the run stops as for SIGTERM, with a
    checkpoint (it died without one). Under nohup, where SIGHUP is ignored, it stays ignored."""
    train_dir, val_dir, _, _ = tiny_shards
    before = signal.getsignal(signal.SIGHUP)
    probe(at_step={1: lambda: os.kill(os.getpid(), signal.SIGHUP)})
    common = ("stages.0.steps=2", "stages.1.steps=1")
    with pytest.raises(RunInterrupted) as err:
        train_mod.train(_recipe(train_dir, val_dir, tmp_path / "run", *common))
    assert err.value.code == 128 + signal.SIGHUP and "interrupted at step 2 by SIGHUP" in str(err.value)
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert signal.getsignal(signal.SIGHUP) is before
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    try:
        done = train_mod.train(_recipe(train_dir, val_dir, tmp_path / "nohup", *common))
        assert done["global_step"] == 3 and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_signal_handlers_survive_a_failed_fit_and_agree_without_ddp(tmp_path):
    """The handlers are restored even when fitting ends in an error (no teardown hook then)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    cb = SignalCheckpoint(tmp_path / "last.ckpt")

    class FakeTrainer:
        world_size = 1

    cb.setup(FakeTrainer(), None, "fit")
    assert signal.getsignal(signal.SIGTERM) == cb._handle
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert cb.received == [signal.SIGUSR1, signal.SIGTERM] and cb._agreed(FakeTrainer()) == _PRIORITY[signal.SIGUSR1]  # requeue wins
    cb.on_exception(FakeTrainer(), None, RuntimeError("boom"))
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_sigint_while_a_stop_is_pending_stops_at_once(tmp_path, monkeypatch, capsys):
    """The first SIGINT asks for a checkpoint at the next step boundary; a second one, for a step
    that never ends, raises KeyboardInterrupt at once, saying so. The same Ctrl-C delivered twice
    within a second (the terminal's and a wrapper's relay, as under `timeout`) is one. Other
    signals only raise the stop's priority."""
    from curriculum import faults

    clock = [100.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: clock[0])
    cb = SignalCheckpoint(tmp_path / "last.ckpt")

    class FakeTrainer:
        world_size = 1

    cb.setup(FakeTrainer(), None, "fit")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert cb.pending == _PRIORITY[signal.SIGINT] and cb.received == [signal.SIGINT]
        clock[0] += 0.2
        os.kill(os.getpid(), signal.SIGINT)  # relayed: the same Ctrl-C
        assert cb.received == [signal.SIGINT]
        os.kill(os.getpid(), signal.SIGTERM)  # not a second Ctrl-C: still a checkpointed stop
        assert cb.pending == _PRIORITY[signal.SIGTERM]
        clock[0] += 2.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert cb.received == [signal.SIGINT, signal.SIGTERM]
        assert "second SIGINT: stopping at once, without a checkpoint" in capsys.readouterr().err
    finally:
        cb.on_exception(FakeTrainer(), None, KeyboardInterrupt())


def test_a_signal_during_the_final_validation_costs_only_the_validation(tiny_shards, tmp_path, add_callback):
    """A signal during the final validation stops it (faults.stop_during_validation). The final
    checkpoint is saved before it, so no step is lost, and a resume only validates."""
    train_dir, val_dir, _, _ = tiny_shards

    class SignalInFinalValidation(pl.Callback):
        sent = False

        def on_validation_start(self, trainer, pl_module):
            if trainer.state.fn == "validate" and not self.sent:
                SignalInFinalValidation.sent = True
                os.kill(os.getpid(), signal.SIGINT)

    add_callback(SignalInFinalValidation())
    out = tmp_path / "run"
    args = ("stages.0.steps=4", "stages.1.steps=1", "trainer.ckpt_every_steps=2")  # ends mid-epoch
    with pytest.raises(RunInterrupted):
        train_mod.train(_recipe(train_dir, val_dir, out, *args))
    final = out / "checkpoints" / "last.ckpt"
    assert read_checkpoint(final)["global_step"] == 5  # not the periodic save of step 4
    resumed = train_mod.train(_recipe(train_dir, val_dir, out, *args, f"resume={final}"))
    assert resumed["global_step"] == 5 and resumed["val"]["images"] == 6


def test_a_run_stopped_before_its_last_validation_validates_when_resumed(tiny_shards, tmp_path, add_callback):
    """A signal caught after the last step's own check stops the run before the epoch-end
    validation (the stop checked at validation start); the resumed run has no step left to train
    and validates the final weights instead of skipping them."""
    train_dir, val_dir, _, _ = tiny_shards

    class SignalAfterTheLastStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 8 and not self.__dict__.get("sent"):
                self.sent = True
                next(c for c in trainer.callbacks if isinstance(c, SignalCheckpoint)).pending = 1

    add_callback(SignalAfterTheLastStep())
    out = tmp_path / "run"  # 8 steps: one epoch of 8 batches, validated at its end
    with pytest.raises(RunInterrupted, match=r"at step 8 by SIGINT \(before validation\)"):
        train_mod.train(_recipe(train_dir, val_dir, out))
    assert not [r for r in read_metrics(out) if r.get("val/near/abs_rel")]
    resumed = train_mod.train(_recipe(train_dir, val_dir, out, f"resume={out / 'checkpoints' / 'last.ckpt'}"))
    assert resumed["global_step"] == 8 and resumed["val"]["images"] == 6
    assert len([r for r in read_metrics(out) if r.get("val/near/abs_rel")]) == 1


def test_a_stop_read_late_is_taken_before_validation_and_resumes_exactly(tiny_shards, tmp_path, monkeypatch, probe):
    """With the agreement read a step late (GPUs under DDP), a signal at the step before a
    validation stops the run before validating, not after it and one more step; resuming from
    that checkpoint ends where an uninterrupted run does."""
    from curriculum import faults

    train_dir, val_dir, _, _ = tiny_shards
    monkeypatch.setattr(faults, "_distributed", lambda trainer: True)  # one process standing in for DDP
    monkeypatch.setattr(faults.dist, "all_reduce", lambda t, op=None: None)
    monkeypatch.setattr(SignalCheckpoint, "read_late", True)
    common = ("stages.0.steps=3", "stages.1.steps=2", "trainer.val_every_steps=2")
    whole = train_mod.train(_recipe(train_dir, val_dir, tmp_path / "whole", *common))
    probe(at_step={1: lambda: os.kill(os.getpid(), signal.SIGTERM)})  # during the step validation follows
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted) as err:
        train_mod.train(_recipe(train_dir, val_dir, out, *common))
    assert err.value.step == 2 and "(before validation)" in str(err.value)
    ckpt_path = out / "checkpoints" / "last.ckpt"
    # (the probe stays: the resumed run starts at step 2, past its step)
    resumed = train_mod.train(_recipe(train_dir, val_dir, tmp_path / "resumed", *common, f"resume={ckpt_path}"))
    assert resumed["global_step"] == whole["global_step"] == 5
    assert _same_weights(model_state(read_checkpoint(resumed["checkpoint"])),
                         model_state(read_checkpoint(whole["checkpoint"])))
    # the validation the stop came before runs first, on the checkpoint's weights: every
    # scheduled validation has its row, with the numbers the uninterrupted run logged
    val = {name: [(int(r["step"]), float(r["val/near/abs_rel"])) for r in read_metrics(tmp_path / name)
                  if r.get("val/near/abs_rel")] for name in ("whole", "resumed")}
    assert [s for s, _ in val["resumed"]] == [s for s, _ in val["whole"]] == [2, 4, 5]  # each once
    assert val["resumed"][0][1] == pytest.approx(val["whole"][0][1], rel=1e-5)


def test_a_validation_lost_with_its_run_runs_first_when_resumed(tiny_shards, tmp_path, add_callback, capsys):
    """A run that dies during a scheduled validation (kill -9, an OOM) leaves the periodic
    checkpoint saved just before it, which Lightning's restore would resume past that
    validation; the resumed run validates that step first, once."""
    train_dir, val_dir, _, _ = tiny_shards

    class DiesDuringTheValidationAtStep4(pl.Callback):
        def on_validation_start(self, trainer, pl_module):
            if trainer.global_step == 4 and not self.__dict__.get("died"):
                self.died = True
                raise MemoryError("killed during validation")

    add_callback(DiesDuringTheValidationAtStep4())
    out = tmp_path / "run"
    common = ("stages.0.steps=3", "stages.1.steps=3", "trainer.val_every_steps=2", "trainer.ckpt_every_steps=2")
    with pytest.raises(MemoryError):
        train_mod.train(_recipe(train_dir, val_dir, out, *common))
    ckpt_path = out / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt_path)["global_step"] == 4
    resumed = train_mod.train(_recipe(train_dir, val_dir, out, *common, f"resume={ckpt_path}", "trainer.progress=true"))
    assert resumed["global_step"] == 6
    printed = capsys.readouterr()
    assert "resume: validating step 4 first" in printed.out
    assert "validation at step 4:" in printed.err  # the checkpoint's step, not the trainer's 0 before fit
    rows = [r for r in read_metrics(out) if r.get("val/near/abs_rel")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert (out / "panels" / "val_panel_step0000004.png").is_file()


@pytest.mark.parametrize("val_every,dies_at,validated", [(4, 5, [4, 8]), (2, 7, [2, 4, 6, 8])])
def test_a_validation_that_finished_before_a_kill_is_not_run_again(tiny_shards, tmp_path, add_callback, capsys,
                                                                   val_every, dies_at, validated):
    """The checkpoint of a validation step is saved before that validation and says it pending;
    once the validation has finished, a note beside the checkpoints says so (the last validated
    step: validations run in order), and a resume after a later kill does not run it again (nor
    log its row twice), whether or not later validations ran before the kill."""
    train_dir, val_dir, _, _ = tiny_shards

    class Dies(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == dies_at and not self.__dict__.get("died"):
                self.died = True
                raise MemoryError("killed")

    add_callback(Dies())
    out = tmp_path / "run"
    common = ("stages.0.steps=4", "stages.1.steps=4", f"trainer.val_every_steps={val_every}",
              "trainer.ckpt_every_steps=4")
    with pytest.raises(MemoryError):
        train_mod.train(_recipe(train_dir, val_dir, out, *common))
    ckpt_path = out / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt_path)["global_step"] == 4
    assert read_checkpoint(ckpt_path)["curriculum"]["validation_pending"] is True  # saved before it
    assert json.loads((out / "checkpoints" / "validated.json").read_text()) == {"step": dies_at - 1}
    resumed = train_mod.train(_recipe(train_dir, val_dir, out, *common, f"resume={ckpt_path}"))
    assert resumed["global_step"] == 8 and "validating step" not in capsys.readouterr().out
    assert [int(r["step"]) for r in read_metrics(out) if r.get("val/near/abs_rel")] == validated
    # a finished run resumed: its final validation is done, not logged again, and its final save
    # keeps the stage and policy of its last step (fit runs no hook to set them)
    final = out / "checkpoints" / "last.ckpt"
    before = read_checkpoint(final)["curriculum"]
    again = train_mod.train(_recipe(train_dir, val_dir, out, *common, f"resume={final}"))
    assert again["global_step"] == 8
    assert [int(r["step"]) for r in read_metrics(out) if r.get("val/near/abs_rel")] == validated
    after = read_checkpoint(final)["curriculum"]
    assert (after["stage"], after["stage_index"], after["policy"]) == (before["stage"], 1, before["policy"])
    assert before["stage"] == "finetune" and before["policy"]["name"] == "max_depth"


def test_an_earlier_attempts_validation_note_does_not_skip_a_pending_validation(tiny_shards, tmp_path, add_callback):
    """Attempt 1 validates step 6 and dies before its next periodic save (last.ckpt at step 4);
    attempt 2 resumes from 4 and is stopped at step 6 before validating it (a checkpoint saying
    the validation is pending). Attempt 1's note said 6: attempt 3 must still validate step 6."""
    train_dir, val_dir, _, _ = tiny_shards

    class Attempts(pl.Callback):
        attempt = 0

        def on_train_start(self, trainer, pl_module):
            self.attempt += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.attempt == 1 and trainer.global_step == 7:
                raise MemoryError("killed")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.attempt == 2 and trainer.global_step == 6:
                next(c for c in trainer.callbacks if isinstance(c, SignalCheckpoint)).pending = 1

    add_callback(Attempts())
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "last.ckpt"
    common = ("stages.0.steps=4", "stages.1.steps=4", "trainer.val_every_steps=2", "trainer.ckpt_every_steps=4")
    with pytest.raises(MemoryError):
        train_mod.train(_recipe(train_dir, val_dir, out, *common))
    assert read_checkpoint(ckpt)["global_step"] == 4
    assert json.loads((out / "checkpoints" / "validated.json").read_text()) == {"step": 6}
    with pytest.raises(RunInterrupted, match="at step 6"):
        train_mod.train(_recipe(train_dir, val_dir, out, *common, f"resume={ckpt}"))
    assert read_checkpoint(ckpt)["curriculum"]["validation_pending"] is True
    done = train_mod.train(_recipe(train_dir, val_dir, out, *common, f"resume={ckpt}"))
    assert done["global_step"] == 8
    assert [int(r["step"]) for r in read_metrics(out) if r.get("val/near/abs_rel")] == [2, 4, 6, 8]


def test_the_validated_note_follows_its_row_onto_disk(tiny_shards, tmp_path, monkeypatch):
    """A kill between the two must not leave a note for a row that was never written."""
    train_dir, val_dir, _, _ = tiny_shards
    seen = []
    write = module_mod.atomic_write_text

    def noting(path, text):
        step = json.loads(text)["step"]
        seen.append((step, [int(r["step"]) for r in read_metrics(tmp_path / "run") if r.get("val/near/abs_rel")]))
        return write(path, text)

    monkeypatch.setattr(module_mod, "atomic_write_text", noting)
    train_mod.train(_recipe(train_dir, val_dir, tmp_path / "run", "stages.0.steps=2", "stages.1.steps=2",
                            "trainer.val_every_steps=2", "trainer.log_every_steps=50"))
    assert [step for step, _ in seen] == [2, 4] and all(step in rows for step, rows in seen)


def test_ranks_read_their_agreement_one_step_late_on_gpus(tmp_path, monkeypatch):
    """Under DDP on GPUs each rank reads the agreed signal a step late (no per-step device sync):
    the stop comes at the boundary after the signal's, on every rank alike; at the end of
    training the agreement is read at once."""
    from curriculum import faults

    class FakeTrainer:
        world_size = 2

        class strategy:
            root_device = torch.device("cpu")

    reduced = []
    monkeypatch.setattr(faults, "_distributed", lambda trainer: True)
    monkeypatch.setattr(faults.dist, "all_reduce", lambda t, op=None: reduced.append(int(t.item())))
    monkeypatch.setattr(SignalCheckpoint, "read_late", True)  # the GPU bookkeeping, on the CPU
    cb = SignalCheckpoint(tmp_path / "last.ckpt")
    cb.setup(FakeTrainer(), None, "fit")
    try:
        assert cb._agreed(FakeTrainer()) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert cb._agreed(FakeTrainer()) == 0  # the boundary right after the signal: not yet read
        term = _PRIORITY[signal.SIGTERM]
        assert cb._agreed(FakeTrainer()) == term  # one step late: SIGTERM
        assert cb._agreed(FakeTrainer(), now=True) == term
        assert reduced == [0, term, term, term]  # every call is a collective, late or not
    finally:
        cb.on_exception(FakeTrainer(), None, RuntimeError("end"))


# ---------------------------------------------------------------------------- 5. checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real 1+1-step run: shards and its final checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    write_tiny_shards(root / "train", n_shards=4, per_shard=4, seed=0)
    write_tiny_shards(root / "val", n_shards=1, per_shard=2, seed=1)
    result = train_mod.train(_recipe(root / "train", root / "val", root / "run", "stages.0.steps=1",
                                     "stages.1.steps=1"))
    return root, Path(result["checkpoint"])


@pytest.mark.parametrize("io_cls,exc,expected", [
    (AtomicCheckpointIO, KeyboardInterrupt(), KeyboardInterrupt),
    (AtomicCheckpointIO, RuntimeError("killed mid-write"), RuntimeError),
    (ReportingCheckpointIO, OSError(errno.ENOSPC, "No space left on device"), CheckpointError),
])
def test_a_crash_mid_write_leaves_the_previous_checkpoint_usable(trained, tmp_path, monkeypatch, io_cls, exc, expected):
    _, path = trained
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_cls().save_checkpoint(ckpt, target)
    previous = target.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])  # the partial file a crash leaves
        raise exc

    monkeypatch.setattr(torch, "save", dies_half_way)
    ckpt["global_step"] = 999
    with pytest.raises(expected) as err:
        io_cls().save_checkpoint(ckpt, target)
    if expected is CheckpointError:
        assert f"cannot write checkpoint {target}: no space left on device" in str(err.value)
    assert target.read_bytes() == previous and read_checkpoint(target)["global_step"] != 999
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp file left


def test_full_disk_during_training_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    write_tiny_shards(tmp_path / "train", n_shards=4, per_shard=4, seed=0)
    write_tiny_shards(tmp_path / "val", n_shards=1, per_shard=2, seed=1)
    real_save = torch.save
    calls = []

    def disk_fills_up(obj, f, *a, **kw):
        calls.append(str(f))
        if len(calls) >= 2:
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    out = tmp_path / "run"
    rc = cli_main(["train", str(RECIPES_DIR / "smoke.yaml"),
                   *_overrides(tmp_path / "train", tmp_path / "val", out, "stages.0.steps=2", "stages.1.steps=1",
                               "trainer.ckpt_every_steps=1")])
    line = _one_line_error(capsys)
    assert rc == 2 and f"cannot write checkpoint {out / 'checkpoints' / 'last.ckpt'}: no space left" in line
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 1  # the step-1 save survives
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]


def test_truncated_checkpoint_is_refused_for_every_use(trained, tmp_path, capsys):
    root, path = trained
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{bad}: corrupt or truncated checkpoint") as e:
        read_checkpoint(bad)
    assert str(e.value).endswith("(PytorchStreamReader failed reading zip archive: failed finding central directory)")
    base = _overrides(root / "train", root / "val", tmp_path / "run", "stages.0.steps=1", "stages.1.steps=1")
    for extra in (f"resume={bad}", f"init_from={bad}"):
        rc = cli_main(["train", str(RECIPES_DIR / "smoke.yaml"), *base, extra])
        line = _one_line_error(capsys)
        assert rc == 2 and str(bad) in line and "corrupt or truncated" in line, extra
    rc = cli_main(["eval", "--checkpoint", str(bad), "--shards", f"{root / 'val'}/*.tar"])
    line = _one_line_error(capsys)
    assert rc == 2 and "corrupt or truncated" in line


def test_fine_tuning_from_another_encoder_names_both(trained, tmp_path, capsys):
    root, path = trained
    rc = cli_main(["train", str(RECIPES_DIR / "smoke.yaml"), str(RECIPES_DIR / "finetune.yaml"),
                   *_overrides(root / "train", root / "val", tmp_path / "run", "stages.0.steps=1",
                               f"init_from={path}", "model.encoder=vits")])
    line = _one_line_error(capsys)
    assert rc == 2 and "encoder: 'tiny' in checkpoint vs 'vits' in recipe" in line and str(path) in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------- 6. configuration and environment


def test_unwritable_output_folder_is_one_line_before_training(trained, tmp_path, capsys):
    root, _ = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = cli_main(["train", str(RECIPES_DIR / "smoke.yaml"),
                   *_overrides(root / "train", root / "val", blocker / "run", "stages.0.steps=1")])
    line = _one_line_error(capsys)
    assert rc == 2 and f"run.out_dir '{blocker / 'run'}' is not writable" in line
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("extra,needle", [
    (("data.num_workers=8",), "4 shards for 1 ranks x 8 workers = 8 readers"),
    (("data.train_shards=/nonexistent/*.tar",), "data.train_shards: shard pattern '/nonexistent/*.tar' matches no shard"),
    (("data.val_shards=/nonexistent/none-*.tar",), "data.val_shards: shard pattern '/nonexistent/none-*.tar' matches"),
    (("data.val_shards=/",), "data.val_shards: '/' is a folder: give its shards, e.g. /*.tar"),
])
def test_shard_problems_are_one_line_and_leave_no_checkpoint(trained, tmp_path, capsys, extra, needle):
    root, _ = trained
    out = tmp_path / "run"
    rc = cli_main(["train", str(RECIPES_DIR / "smoke.yaml"),
                   *_overrides(root / "train", root / "val", out, "stages.0.steps=1", *extra)])
    line = _one_line_error(capsys)
    assert rc == 2 and needle in line
    assert not list(out.glob("checkpoints/*"))


# ---------------------------------------------------------------------------- 7. fuzzing

# `make test` runs a quick sample, `make test-faults` a larger one; both fixed unless
# CURRICULUM_FUZZ=random (tests/conftest.py).
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate])
FUZZ_DEEP = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
_MEMBERS = ["__key__", "meta.json", "rgb.png", "rgb.jpg", "depth.png", "sky.png", ".depth.png", "other.txt"]


def _png(arr) -> bytes:
    return cv2.imencode(".png", arr)[1].tobytes()


_GOOD = _sample("good_0", "normal", np.random.default_rng(0))
_images = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([_GOOD["rgb.png"], _GOOD["depth.png"], _GOOD["sky.png"],
                     _png(np.zeros((56, 112), np.uint8)), _png(np.zeros((56, 112, 3), np.uint16)),
                     _png(np.zeros((56, 112, 4), np.uint8)), _png(np.zeros((3, 5), np.uint16))]),
    st.builds(lambda b, cut: b[:cut], st.sampled_from([_GOOD["rgb.png"], _GOOD["depth.png"]]), st.integers(0, 3000)),
)
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                            max_leaves=6)
_metas = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda m, k, v: json.dumps({**m, k: v}).encode(), st.just(json.loads(_GOOD["meta.json"])),
              st.sampled_from(["schema", "width", "height", "fx", "depth_scale", "frame", "source", "x"]), _json_values),
    _json_values.map(lambda v: json.dumps(v).encode()),
)


_DECODER_INPUTS = (
    st.dictionaries(st.sampled_from(_MEMBERS), st.one_of(_images, _metas, st.text(max_size=8), st.integers(),
                                                         st.none()), max_size=7),
    st.sampled_from(["meta.json", "rgb.png", "depth.png", "sky.png", None]), _metas, _images,
)


@settings(FUZZ, max_examples=200)
@given(*_DECODER_INPUTS)
def test_fuzz_decode_sample_raises_only_sample_error(sample, field, meta, image):
    _decode_only_sample_errors(sample, field, meta, image)


@pytest.mark.slow
@settings(FUZZ_DEEP, max_examples=3000)
@given(*_DECODER_INPUTS)
def test_fuzz_decode_sample_deep(sample, field, meta, image):
    _decode_only_sample_errors(sample, field, meta, image)


def _decode_only_sample_errors(sample, field, meta, image):
    if field is not None:  # near-valid samples: one member of a good sample replaced
        sample = dict(_GOOD, **{field: meta if field == "meta.json" else image})
    with _no_hang(20):
        try:
            out = decode_sample(sample)
        except SampleError as exc:
            assert str(exc)
            if "\n" not in str(sample.get("__key__", "")):
                assert "\n" not in str(exc), str(exc)
            return
    assert out["depth_raw"].dtype == np.uint16 and out["rgb"].dtype == np.uint8


_KEYS = ["run.name", "run.seed", "data.batch_size", "data.num_workers", "data.crop_height", "model.encoder",
         "model.head", "model.max_depth", "stages", "stages.0", "stages.0.steps", "stages.0.policy",
         "stages.0.policy.name", "stages.0.policy.max_depth", "stages.1.name", "stages.x.y", "trainer.devices",
         "trainer.precision", "logging.mode", "init_from", "resume", "optim", "loss", "run", "run.name.x",
         "data..x", "nope", "a.b"]
_VALUES = st.one_of(st.text(max_size=12), st.sampled_from(
    ["", "1", "-1", "0", "1e999", "nan", ".inf", "null", "[1, 2]", "{a: 1}", "[", "{", "'", "*a", "&a 1", "\x1f",
     "${a}", "${oc.env:HOME}", "!!python/object:os.system", "{name: max_depth}", "[{name: a, steps: 1}]",
     "max_depth", "true", "- 1"]))
_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) |
    st.sampled_from(["${x}", "???", "${oc.env:HOME}", "${run.name}", {}, [], "max_depth"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(_KEYS + ["name", "steps", "x"]) |
                                                          st.text(max_size=5), c, max_size=3),
    max_leaves=8)


def _load_only_recipe_errors(files, overrides, one_line=False):
    with _no_hang(20):
        try:
            load_recipe(files, overrides)
        except RecipeError as exc:
            assert type(exc) is RecipeError and str(exc).strip(), repr(exc)
            if one_line:
                assert "\n" not in str(exc), repr(exc)


_OVERRIDES = st.lists(st.tuples(st.sampled_from(_KEYS) | st.text(max_size=10), _VALUES), max_size=4)


@FUZZ
@given(_OVERRIDES)
def test_fuzz_recipe_overrides_raise_only_recipe_error(pairs):
    _overrides_only_recipe_errors(pairs)


@pytest.mark.slow
@FUZZ_DEEP
@given(_OVERRIDES)
def test_fuzz_recipe_overrides_deep(pairs):
    _overrides_only_recipe_errors(pairs)


def _overrides_only_recipe_errors(pairs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        overrides = [f"{k}={v}" for k, v in pairs]
        _load_only_recipe_errors([RECIPES_DIR / "smoke.yaml"], overrides,
                                 one_line=not any("\n" in o or "\r" in o for o in overrides))


_SHAPES = st.sampled_from([{}, [], None, 1, "x", "${x}", "${oc.env:HOME}", "???", [{"name": "a"}], {"name": "${x}"}])


_RECIPE_DATA = st.dictionaries(st.sampled_from(["run", "data", "model", "loss", "optim", "stages", "trainer",
                                                "logging", "init_from", "resume", "x"]),
                               _SHAPES | _yaml_values, min_size=1, max_size=4) | _yaml_values


@FUZZ
@given(_RECIPE_DATA)
def test_fuzz_recipe_files_raise_only_recipe_error(data):
    _file_only_recipe_errors(data)


@pytest.mark.slow
@FUZZ_DEEP
@given(_RECIPE_DATA)
def test_fuzz_recipe_files_deep(data):
    _file_only_recipe_errors(data)


def _file_only_recipe_errors(data):
    _text_only_recipe_errors(yaml.safe_dump(data), base=[RECIPES_DIR / "smoke.yaml"])


_TEXT = st.text(max_size=80) | st.binary(max_size=80).map(lambda b: b.decode("latin-1"))


@FUZZ
@given(_TEXT)
def test_fuzz_recipe_text_raises_only_recipe_error(text):
    _text_only_recipe_errors(text)


@pytest.mark.slow
@FUZZ_DEEP
@given(_TEXT)
def test_fuzz_recipe_text_deep(text):
    _text_only_recipe_errors(text)


def _text_only_recipe_errors(text, base=()):
    """``text`` as a recipe file (layered over ``base``) loads or raises RecipeError, nothing else."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _load_only_recipe_errors([*base, path], [])


# ---------------------------------------------------------------------------- slow: processes, DDP, kills

RUNNER = r'''
"""Runs `curriculum train` with test hooks: per-rank records and optional non-finite losses."""
import hashlib, json, os, sys, time
from pathlib import Path
import lightning.pytorch as pl
import torch
import curriculum.module as M
import curriculum.train as T
from curriculum.cli import main

NAN_STEPS = set(json.loads(os.environ.get("FAULT_NAN_STEPS", "[]")))
NAN_RANK = int(os.environ.get("FAULT_NAN_RANK", "0"))
NAN_MODE = os.environ.get("FAULT_NAN_MODE", "nan")
PAUSE_AT = int(os.environ.get("FAULT_PAUSE_AT", "-1"))  # rank 0 waits after this global step
state = {}


class Record(pl.Callback):
    def __init__(self, out):
        self.out, self.rows = Path(out), []

    def setup(self, trainer, pl_module, stage):
        state["trainer"] = trainer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append({"step": trainer.global_step, "loss": float(outputs["loss"]),
                          "valid_fraction": float(m["train/valid_fraction"]), "stage": pl_module.stage_index,
                          "skipped": pl_module.skipped_steps, "keys": list(batch["key"])})
        if trainer.global_step == PAUSE_AT and trainer.global_rank == 0:
            # a fixed point for the test to send its signal: "paused" out, wait for "go"
            (self.out / "paused").write_text(str(trainer.global_step))
            deadline = time.monotonic() + 120
            while not (self.out / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    def _dump(self, trainer, pl_module, status):
        digest = hashlib.sha256()
        for v in pl_module.model.state_dict().values():
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        path = self.out / "ranks" / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"status": status, "global_step": trainer.global_step, "rows": self.rows,
                                    "skipped": pl_module.skipped_steps, "weights": digest.hexdigest()}))

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, pl_module, "done")

    def on_exception(self, trainer, pl_module, exception):
        self._dump(trainer, pl_module, type(exception).__name__)


original_loss = M.compute_loss


def loss_with_faults(*args, **kwargs):
    out = original_loss(*args, **kwargs)
    trainer = state.get("trainer")
    if trainer is not None and trainer.global_rank == NAN_RANK and trainer.global_step in NAN_STEPS:
        bad = out["loss"] + float("inf") if NAN_MODE == "inf" else out["loss"] * float("nan")
        out = dict(out, loss=bad)
    return out


M.compute_loss = loss_with_faults
original_build = T.build_trainer


def build(recipe, out_dir, loggers):
    trainer = original_build(recipe, out_dir, loggers)
    trainer.callbacks.append(Record(out_dir))
    return trainer


T.build_trainer = build
sys.exit(main(sys.argv[1:]))
'''


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
              "SLURM_NTASKS", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def _runner(tmp_path) -> Path:
    path = tmp_path / "fault_runner.py"
    path.write_text(RUNNER)
    return path


def _ranks(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "ranks").glob("rank*.json"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_args(train_dir, val_dir, out, *extra):
    return ["train", str(RECIPES_DIR / "smoke.yaml"), *_overrides(train_dir, val_dir, out),
            "trainer.strategy=ddp", "trainer.devices=2", *extra]


@pytest.mark.slow
def test_empty_masks_on_one_ddp_rank_keep_both_ranks_stepping(tmp_path):
    """80 m stage, batch 1: crops that are all sky or all beyond 80 m empty one rank's mask while
    the other rank's is not; both ranks keep stepping in lockstep with finite losses."""
    layout = [["sky", "normal", "far", "normal"], ["normal", "sky", "normal", "far"],
              ["far", "normal", "sky", "normal"], ["normal", "far", "normal", "sky"]]
    _write_shards(tmp_path / "train", layout)
    write_tiny_shards(tmp_path / "val", n_shards=2, per_shard=1, seed=1)
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, str(_runner(tmp_path)),
                           *_ddp_args(tmp_path / "train", tmp_path / "val", out, "stages.0.steps=1",
                                      "stages.1.steps=7", "data.batch_size=1", "data.val_batch_size=1")],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _ranks(out)
    assert r0["status"] == r1["status"] == "done" and r0["global_step"] == r1["global_step"] == 8
    assert r0["weights"] == r1["weights"]  # replicas in lockstep
    assert all(np.isfinite(row["loss"]) for r in (r0, r1) for row in r["rows"])
    fine = [(a["valid_fraction"], b["valid_fraction"]) for a, b in zip(r0["rows"], r1["rows"]) if a["stage"] == 1]
    assert any((a == 0) != (b == 0) for a, b in fine), fine  # one rank empty, the other not
    assert r0["skipped"] == r1["skipped"] == 0  # an empty mask is a zero loss, not a skipped step


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nan", "inf"])
def test_nonfinite_loss_on_one_ddp_rank_is_skipped_on_every_rank(tmp_path, mode):
    """`nan` poisons the gradients (averaged over ranks); `inf` is a constant that leaves them
    finite, so only an agreement between ranks keeps the replicas equal."""
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    write_tiny_shards(train_dir, n_shards=4, per_shard=4, seed=0)
    write_tiny_shards(val_dir, n_shards=2, per_shard=1, seed=1)
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, str(_runner(tmp_path)),
                           *_ddp_args(train_dir, val_dir, out, "stages.0.steps=2", "stages.1.steps=2")],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env(FAULT_NAN_STEPS="[1, 2]", FAULT_NAN_RANK="1", FAULT_NAN_MODE=mode))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _ranks(out)
    assert r0["global_step"] == r1["global_step"] == 4
    assert r0["skipped"] == r1["skipped"] == 2
    assert r0["weights"] == r1["weights"]
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["curriculum"]["skipped_steps"] == 2


# --- killed runs: a 4 + 4 step curriculum; the run pauses at a chosen step, the test signals it
# there, so where it stops is exact however fast or slow the machine is.

KILL_STAGES = ("stages.0.steps=4", "stages.1.steps=4")


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_tiny_shards(root / "train", n_shards=4, per_shard=4, seed=0)
    write_tiny_shards(root / "val", n_shards=1, per_shard=2, seed=1)
    (root / "fault_runner.py").write_text(RUNNER)
    return root


def _cli(root, out, *extra, runner=False) -> list[str]:
    entry = [str(root / "fault_runner.py")] if runner else ["-m", "curriculum.cli"]
    return [sys.executable, *entry, "train", str(RECIPES_DIR / "smoke.yaml"),
            *_overrides(root / "train", root / "val", out, *KILL_STAGES, *extra)]


@pytest.fixture(scope="module")
def uninterrupted(kill_data):
    out = kill_data / "full"
    proc = subprocess.run(_cli(kill_data, out), capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary" / "rank0.json").read_text())
    return summary, model_state(read_checkpoint(out / "checkpoints" / "last.ckpt"))


def _pause_and_signal(cmd, out, pause_at: int, signum, env=None, group=False):
    """Run `cmd` (the fault runner) until it pauses after `pause_at`, send `signum` (to its whole
    process group, loader workers included, if `group`), let it go on."""
    env = dict(env or _env(), FAULT_PAUSE_AT=str(pause_at))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=group)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (Path(out) / "paused").exists():
            if proc.poll() is not None:
                pytest.fail(f"run ended before step {pause_at}: {proc.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "run made no progress"
            time.sleep(0.05)
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        time.sleep(0.2)
        (Path(out) / "go").write_text("")
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr


def _resume_and_compare(kill_data, uninterrupted, out, ckpt):
    summary, full_weights = uninterrupted
    resumed = out.parent / (out.name + "-resumed")
    proc = subprocess.run(_cli(kill_data, resumed, f"resume={ckpt}"), capture_output=True, text=True,
                          timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((resumed / "summary" / "rank0.json").read_text())
    assert again["global_step"] == summary["global_step"] == 8
    assert again["switches"] == summary["switches"] == [[0, "pretrain"], [4, "finetune"]]
    weights = model_state(read_checkpoint(resumed / "checkpoints" / "last.ckpt"))
    for k, v in full_weights.items():
        assert torch.allclose(weights[k], v, atol=1e-6, rtol=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("signum,pause_at", [
    (signal.SIGTERM, 1),  # stage 1 (steps 0-3)
    (signal.SIGINT, 5),  # stage 2 (steps 4-7)
    (signal.SIGTERM, 6),
])
def test_signal_mid_stage_then_resume_matches_an_uninterrupted_run(kill_data, uninterrupted, signum, pause_at):
    out = kill_data / f"sig{int(signum)}-{pause_at}"
    rc, stderr = _pause_and_signal(_cli(kill_data, out, runner=True), out, pause_at, signum)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert rc == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    # the step that was running when the signal came is finished, then the run stops
    assert f"interrupted at step {pause_at + 1} by {name}; checkpoint saved to {ckpt}; resume with resume={ckpt}" \
        in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    assert read_checkpoint(ckpt)["global_step"] == pause_at + 1
    assert not (out / "summary").exists()
    _resume_and_compare(kill_data, uninterrupted, out, ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [
    signal.SIGINT,  # Ctrl-C in a terminal
    signal.SIGTERM,
    signal.SIGHUP,  # the terminal closed
])
def test_signal_to_the_process_group_with_loader_workers(kill_data, signum):
    out = kill_data / f"group{int(signum)}"
    rc, stderr = _pause_and_signal(_cli(kill_data, out, "data.num_workers=2", runner=True), out, 2, signum,
                                   group=True)
    assert rc == 128 + signum, stderr[-3000:]
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.slow
def test_kill_9_loses_at_most_the_steps_since_the_last_periodic_checkpoint(kill_data, uninterrupted):
    out = kill_data / "kill9"
    rc, _ = _pause_and_signal(_cli(kill_data, out, "trainer.ckpt_every_steps=2", runner=True), out, 5,
                              signal.SIGKILL)
    assert rc == -signal.SIGKILL
    ckpt = out / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["global_step"] == 4  # steps 5 and 6 (the one killed) are lost
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.ckpt"]
    _resume_and_compare(kill_data, uninterrupted, out, ckpt)


@pytest.mark.slow
def test_each_ddp_rank_resumes_its_own_streams_and_bad_sample_count(tmp_path):
    """Failed decodes, more on one rank than the other: the checkpoint rank 0 writes holds both
    ranks' stream positions and counts, and each resumed rank trains on exactly the batches of
    an uninterrupted run."""
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    _write_shards(train_dir, [*_DECODE_FAILURES, ["normal", "bad_json"] + ["normal"] * 6, ["normal"] * 8,
                              ["depth8"] + ["normal"] * 7])
    write_tiny_shards(val_dir, n_shards=2, per_shard=1, seed=1)
    runner = _runner(tmp_path)

    def run(out, *extra, pause_at=None):
        cmd = [sys.executable, str(runner), *_ddp_args(train_dir, val_dir, out, *KILL_STAGES,
                                                        "data.shuffle_buffer=1", *extra)]
        if pause_at is None:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            rc, stderr = _pause_and_signal(cmd, out, pause_at, signal.SIGTERM)
            assert rc == 128 + signal.SIGTERM, stderr[-3000:]
        return _ranks(out), read_checkpoint(Path(out) / "checkpoints" / "last.ckpt")["curriculum"]

    whole, whole_meta = run(tmp_path / "whole")
    _, stopped = run(tmp_path / "run", pause_at=2)
    position = stopped["data_position"]
    assert position["world_size"] == 2 and len(position["drawn"]) == len(position["bad_samples"]) == 2
    assert position["bad_samples"][0] != position["bad_samples"][1]  # each rank its own count
    resumed, resumed_meta = run(tmp_path / "resumed", f"resume={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    for rank in (0, 1):
        want = {row["step"]: row["keys"] for row in whole[rank]["rows"] if row["step"] > 3}
        assert {row["step"]: row["keys"] for row in resumed[rank]["rows"]} == want, rank
    assert resumed_meta["data_position"] == whole_meta["data_position"]
    assert resumed[0]["weights"] == whole[0]["weights"]


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_and_requeues(kill_data, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls"
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    out = tmp_path / "usr1"
    env = _env(SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}")
    rc, stderr = _pause_and_signal(_cli(kill_data, out, runner=True), out, 2, signal.SIGUSR1, env=env)
    assert rc == 128 + signal.SIGUSR1, stderr[-3000:]
    assert "interrupted at step 3 by SIGUSR1" in stderr and "SLURM job requeued" in stderr
    assert calls.read_text().split() == ["requeue", "4242"]
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.slow
def test_sigterm_to_one_ddp_rank_stops_both_at_the_same_step(tmp_path):
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    write_tiny_shards(train_dir, n_shards=4, per_shard=4, seed=0)
    write_tiny_shards(val_dir, n_shards=2, per_shard=1, seed=1)
    out = tmp_path / "ddp"
    cmd = [sys.executable, str(_runner(tmp_path)), *_ddp_args(train_dir, val_dir, out, *KILL_STAGES)]
    rc, stderr = _pause_and_signal(cmd, out, 2, signal.SIGTERM)  # rank 0 only: rank 1 is not signalled
    assert rc == 128 + signal.SIGTERM, stderr[-3000:]
    r0, r1 = _ranks(out)  # rank 1 shares rank 0's pipes: both have exited here
    assert r0["status"] == r1["status"] == "RunInterrupted"
    assert r0["global_step"] == r1["global_step"] == 3
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert r0["weights"] == r1["weights"]
