import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw a fixed sample of cases (derived from each test's name), so a test run's
# verdict does not depend on luck; CURRICULUM_FUZZ=random draws new cases each run.
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("random")
settings.load_profile("random" if os.environ.get("CURRICULUM_FUZZ") == "random" else "fixed")

# Real frames shared by the project (read-only); tests copy them into tmp dirs.
FIXTURES = Path(os.environ.get("CURRICULUM_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


# A user's own W&B settings (an exported API key or WANDB_MODE, a netrc login) and a launcher's
# rank variables (torchrun, SLURM) would change what the tests see; each test starts without them
# and sets what it needs.
_OUTSIDE_PREFIXES = ("WANDB_", "SLURM_")
_OUTSIDE_NAMES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"}


@pytest.fixture(autouse=True)
def _without_outside_settings(monkeypatch, tmp_path_factory):
    import signal

    for name in list(os.environ):
        if name.startswith(_OUTSIDE_PREFIXES) or name in _OUTSIDE_NAMES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path_factory.getbasetemp() / "no-netrc"))
    # the tests of hangups expect SIGHUP's default, which `nohup make test` would have ignored (and
    # subprocesses inherit what the test process has)
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, hangup)


@pytest.fixture
def compile_backend(monkeypatch):
    """``compile_backend(backend)``: every ``torch.compile`` in the test uses ``backend`` (``"eager"``
    or a dynamo ``CompileCounter`` for a graph capture in seconds); dynamo's caches are cleared
    before and after, so no graph crosses tests."""
    import torch

    real_compile = torch.compile

    def use(backend):
        torch._dynamo.reset()
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend, **kw))
        return backend

    yield use
    torch._dynamo.reset()


@pytest.fixture
def add_callback(monkeypatch):
    """``add_callback(cb)``: the trainer of the next ``curriculum.train.train()`` call gets ``cb``
    appended to its callbacks (a hook inside a real run)."""
    from curriculum import train as train_mod

    def add(callback):
        build = train_mod.build_trainer

        def with_callback(recipe, out_dir, loggers):
            trainer = build(recipe, out_dir, loggers)
            trainer.callbacks.append(callback)
            return trainer

        monkeypatch.setattr(train_mod, "build_trainer", with_callback)
        return callback

    return add


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (set CURRICULUM_FIXTURES)")
    return FIXTURES


def write_tiny_shards(folder: Path, n_shards: int = 2, per_shard: int = 4, height: int = 56, width: int = 112,
                      seed: int = 0, prefix: str = "shard") -> list[str]:
    """Tiny shards in the v1 schema: a ramp of depths with a sky band (65535) and a hole (0)."""
    import numpy as np

    from data_prep.schema import encode_sample
    from data_prep.writer import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(folder, prefix=prefix, max_samples=per_shard) as writer:
        for i in range(n_shards * per_shard):
            rows = np.linspace(150.0, 5.0, height, dtype=np.float32)[:, None].repeat(width, 1)
            depth_m = rows * (1.0 + 0.2 * rng.random())
            raw = np.round(depth_m / 0.01).astype(np.uint16)
            sky = np.zeros((height, width), bool)
            sky[: height // 4] = True
            raw[sky] = 65535
            raw[-2:, :3] = 0
            rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            rgb[sky] = (135, 200, 250)
            meta = {"source": "test", "scene": f"s{seed}", "frame": i, "width": width, "height": height,
                    "fx": 100.0, "fy": 100.0, "cx": width / 2, "cy": height / 2, "depth_scale": 0.01}
            writer.write(encode_sample(f"test_s{seed}_{i:04d}", rgb, raw, meta, sky=sky))
    return sorted(str(p) for p in Path(folder).glob("*.tar"))


@pytest.fixture
def tiny_shards(tmp_path):
    train = write_tiny_shards(tmp_path / "train", n_shards=4, per_shard=4, seed=0)
    val = write_tiny_shards(tmp_path / "val", n_shards=2, per_shard=3, seed=1)
    return tmp_path / "train", tmp_path / "val", train, val


def read_metrics(out_dir) -> list[dict]:
    """The rows of a run's metrics.csv."""
    import csv

    with open(Path(out_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_folder(folder: Path) -> dict:
    """Every sample of a shard folder, decoded and keyed by ``__key__`` (raw dict kept under
    ``raw_sample``); the shards must read without a problem."""
    from data_prep import check
    from data_prep.schema import decode_sample

    problems = []
    out = {}
    for shard in sorted(Path(folder).glob("*.tar")):
        for raw in check.read_shard(shard, problems):
            d = decode_sample(raw)
            d["raw_sample"] = raw
            out[d["key"]] = d
    assert problems == []
    return out


# every kind of value a key=value override can carry, for the loaders' robustness tests
OVERRIDE_VALUES = ["", "1", "-1", "16", "1.5", "nan", "true", "null", "[]", "{}", "[1,2]", "abc", "'1'", "0x10", "[",
                   "a: b", "${x}", "${name}", "???", "'"]


def assert_each_override_loads_or_fails_in_one_line(load, key: str) -> None:
    """``load([f"{key}={value}"])`` for every value in OVERRIDE_VALUES ends in a result or in one
    RecipeError line: no traceback, and no library warning on the console."""
    import warnings

    from curriculum.config import RecipeError

    for value in OVERRIDE_VALUES:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                load([f"{key}={value}"])
            except RecipeError as e:
                assert "\n" not in str(e) and str(e), f"{key}={value}"
