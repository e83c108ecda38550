"""The benchmark scripts keep working: tiny CPU runs of both, JSON fields and positive numbers."""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)  # by its own name: worker processes unpickle its functions


@pytest.fixture(scope="module")
def train_step():
    return _load("train_step")


@pytest.fixture(scope="module")
def data_pipeline():
    return _load("data_pipeline")


def test_train_step_main_cpu(train_step, tmp_path):
    out = tmp_path / "train_step.json"
    rc = train_step.main(["--encoders", "tiny", "--size", "28x42", "--batch", "2", "--steps", "1", "--warmup", "1",
                          "--modes", "fp32,bf16", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "train_step" and result["machine"]["device"].startswith("CPU")
    assert "img/s" in result["table"] and "TFLOP/s" in result["table"]
    rows = result["rows"]
    assert [(r["encoder"], r["mode"]) for r in rows] == [("tiny", "fp32"), ("tiny", "bf16")]
    for r in rows:
        assert "error" not in r, r
        for key in ("img_per_s", "queued_img_per_s", "tflops_per_s", "step_s", "flops_per_image"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["batch"] == 2 and r["size"] == [28, 42]
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        assert r["skipped_steps"] == 0
        assert r["peak_mem_gib"] is None and r["peak_reserved_gib"] is None  # CUDA memory only
    assert "peak GiB reserved" in result["table"]
    # the same model and batch: fp32 and bf16 start from losses within bf16 noise
    assert abs(rows[0]["first_loss"] - rows[1]["first_loss"]) < 2e-2 * rows[0]["first_loss"]


def test_a_run_cut_short_in_the_trainer_column_keeps_its_step_figures(train_step, tmp_path, monkeypatch):
    """A time limit that ends the run while the trainer column runs (a slow Lightning start, a
    recompile) keeps the step figures measured before it: they are written first; and the
    trainer column's Lightning loop has no stop-signal checkpoint to write."""
    out = tmp_path / "train_step.json"

    def killed(*args, **kwargs):
        raise SystemExit(143)

    monkeypatch.setattr(train_step, "trainer_rate", killed)
    with pytest.raises(SystemExit):
        train_step.main(["--encoders", "tiny", "--size", "28x42", "--batch", "2", "--steps", "1", "--warmup", "1",
                         "--modes", "fp32", "--device", "cpu", "--trainer", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["encoder"], r["mode"]) for r in rows] == [("tiny", "fp32")] and rows[0]["img_per_s"] > 0


def test_train_step_counts_attention_flops_on_the_cpu(train_step, monkeypatch):
    """torch's FLOP table knows only the CUDA attention kernels; the CPU ones are mapped by hand,
    so the CPU count includes exactly the attention FLOPs of every block, forward and backward."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    from curriculum.module import DepthModule

    module = DepthModule(train_step.recipe_for("tiny"))
    batch = train_step.make_batch(1, 28, 42, torch.device("cpu"))
    with_attention = train_step.count_flops(module, batch)
    monkeypatch.setattr(train_step, "CUSTOM_FLOPS", {})
    without = train_step.count_flops(module, batch)
    vit = module.model.pretrained
    heads, tokens = vit.blocks[0].attn.num_heads, 2 * 3 + 1  # a 28x42 image: 2x3 patches and the class token
    q = (1, heads, tokens, vit.embed_dim // heads)
    per_block = sdpa_flop_count(q, q, q) + sdpa_backward_flop_count(q, q, q, q)
    assert with_attention - without == len(vit.blocks) * per_block > 0


def test_train_step_host_check_catches_nan_and_inf(train_step):
    """--grad-check host: the decision DepthModule takes on the device (tests/test_optim.py), on the host."""
    params = [torch.nn.Parameter(torch.ones(shape)) for shape in ((3,), (2, 2), (1,))]
    params[2].grad = None
    loss = torch.tensor(1.0)
    for bad in (None, float("nan"), float("inf"), -float("inf")):
        params[0].grad = torch.zeros(3)
        params[1].grad = torch.full((2, 2), 1e3)
        if bad is not None:
            params[1].grad[1, 0] = bad
        assert train_step._host_check(params, loss) == (bad is None)
    params[1].grad = torch.zeros(2, 2)
    assert not train_step._host_check(params, torch.tensor(float("nan")))


@pytest.mark.parametrize("grad_check", ["module", "host", "none"])
def test_train_step_clips_gradients_as_training_does(train_step, grad_check):
    """A recipe's optim.grad_clip applies to the benchmark's step as to DepthModule's: the step
    leaves the same clipped gradients and weights as a hand-made step that clips them. (The
    gradients are compared: Adam's first update hardly depends on their scale.)"""
    import copy

    from curriculum.module import DepthModule

    module = DepthModule(train_step.recipe_for("tiny", ["optim.grad_clip=0.01"]))
    reference = copy.deepcopy(module)
    batch = train_step.make_batch(2, 28, 42, torch.device("cpu"))
    step = train_step.Step(module, None, grad_check)
    step(batch)

    ref_step = train_step.Step(reference, None, "none")
    ref_step.loss(batch).backward()
    assert torch.nn.utils.clip_grad_norm_(ref_step.params, 0.01) > 0.1  # the bound bites
    ref_step.optimizer.step()
    for p, q in zip(step.params, ref_step.params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_reference_loader_mirrors_the_reference(data_pipeline, tmp_path):
    import cv2

    from reference_loader import ReferenceDataset, lower_bound_size

    assert lower_bound_size(1242, 375, 518, 518) == (1722, 518)  # vKITTI2 frames
    assert lower_bound_size(640, 480, 518, 518) == (686, 518)
    rgb = np.random.default_rng(0).integers(0, 256, (38, 124, 3), dtype=np.uint8)
    depth = np.full((38, 124), 9000, np.uint16)  # 90 m: beyond the 80 m mask
    depth[20:] = 1234
    cv2.imwrite(str(tmp_path / "a.jpg"), rgb)
    cv2.imwrite(str(tmp_path / "a.png"), depth)
    s = ReferenceDataset([(str(tmp_path / "a.jpg"), str(tmp_path / "a.png"))], size=42)[0]
    assert s["image"].dtype == torch.float32 and tuple(s["image"].shape) == (3, 42, 42)
    assert s["depth"].dtype == torch.float32 and np.isin(s["depth"].numpy(), np.float32([90.0, 12.34])).all()
    torch.testing.assert_close(s["valid_mask"], s["depth"] <= 80)
    # ImageNet-normalised; cubic resizing overshoots [0, 1] a little, as in the reference
    assert -3.0 < float(s["image"].min()) < -1.5 and 2.0 < float(s["image"].max()) < 3.5
    # the reference's order, written out: the whole frame resized (float64), normalised, then cropped
    # at the same random window; a loader that crops first (cheaper) does not give these values
    new_w, new_h = lower_bound_size(124, 38, 42, 42)
    whole = cv2.resize(cv2.cvtColor(cv2.imread(str(tmp_path / "a.jpg")), cv2.COLOR_BGR2RGB) / 255.0, (new_w, new_h),
                       interpolation=cv2.INTER_CUBIC)
    whole = ((whole - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1).astype(np.float32)
    ds = ReferenceDataset([(str(tmp_path / "a.jpg"), str(tmp_path / "a.png"))], size=42, seed=5)
    rng = np.random.default_rng([5, 0, 0])  # the first draw of item 0
    y0, x0 = int(rng.integers(0, new_h - 42 + 1)), int(rng.integers(0, new_w - 42 + 1))
    assert x0 > 0  # a window inside the frame, where crop-then-resize would differ
    np.testing.assert_array_equal(ds[0]["image"].numpy(), whole[:, y0:y0 + 42, x0:x0 + 42])


def test_data_pipeline_main_cpu(data_pipeline, tmp_path):
    out = tmp_path / "data_pipeline.json"
    rc = data_pipeline.main(["--frames", "4", "--width", "124", "--height", "38", "--crop", "42", "--batch", "2",
                             "--workers", "0,1", "--batches", "2", "--ref-batches", "1", "--repeats", "1",
                             "--cache", str(tmp_path / "cache"), "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "data_pipeline"
    assert result["config"]["frame_size"] == [124, 38] and result["config"]["shards"] >= 1
    assert [r["workers"] for r in result["rows"]] == [0, 1]
    for r in result["rows"]:
        for key in ("ours_samples_per_s", "ours_per_core", "ours_samples_per_cpu_s", "reference_samples_per_s",
                    "reference_per_core", "reference_samples_per_cpu_s", "ratio", "ratio_cpu"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["ours_samples"] == 2 * 2 * r["cores"] and r["reference_samples"] == 2 * r["cores"]
    assert "ratio" in result["table"]
    # a second run reuses the cached frames and shards: the same files, not rewritten
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert data_pipeline.main(["--frames", "4", "--width", "124", "--height", "38", "--crop", "42", "--batch", "2",
                               "--workers", "0", "--batches", "1", "--ref-batches", "1", "--repeats", "1",
                               "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == files


def test_train_step_profile_and_resize_switch(train_step, tmp_path, recwarn):
    out = tmp_path / "ts.json"
    rc = train_step.main(["--encoders", "tiny", "--size", "28x42", "--batch", "1", "--steps", "1", "--warmup", "1",
                          "--modes", "fp32", "--device", "cpu", "--resize", "matmul", "--profile", "tiny:fp32",
                          "--profile-steps", "1", "--trainer", "--json", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["resize"] == "matmul" and "profile" not in row  # the table goes to its own file
    assert row["trainer_img_per_s"] > 0 and math.isfinite(row["trainer_img_per_s"])  # --trainer after the profile
    # the trainer column has no validation loader on purpose: Lightning's notices about it stay off
    assert not [w for w in recwarn if "val_dataloader" in str(w.message) or "many workers" in str(w.message)]
    profile = (tmp_path / "ts.profile.txt").read_text()
    assert profile.startswith("== tiny fp32 batch 1") and "aten::" in profile


def test_data_pipeline_device_resize_on_cpu(data_pipeline, tmp_path):
    out = tmp_path / "dp.json"
    rc = data_pipeline.main(["--frames", "4", "--width", "124", "--height", "38", "--crop", "42", "--batch", "2",
                             "--workers", "0", "--batches", "2", "--ref-batches", "1", "--repeats", "1",
                             "--device-resize", "on", "--cache", str(tmp_path / "cache"), "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["config"]["device_resize"] is True and result["config"]["device"] == "cpu"
    assert result["rows"][0]["ours_samples"] == 4


def test_train_step_sdpa_switch_allows_one_attention_kernel(train_step):
    names = ("flash", "cudnn", "mem_efficient", "math")
    before = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in names}
    try:
        train_step.use_sdpa_backend("math")
        assert {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in names} == {
            "flash": False, "cudnn": False, "mem_efficient": False, "math": True}
        train_step.use_sdpa_backend("auto")  # leaves the flags as they are
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    finally:
        for n, on in before.items():
            getattr(torch.backends.cuda, f"enable_{n}_sdp")(on)


def test_flops_are_counted_with_every_attention_kernel_allowed(train_step, monkeypatch):
    """The FLOP count runs the model in fp32, which flash and cuDNN attention refuse: with
    --sdpa flash it must count with every kernel allowed, then leave flash alone again."""
    from curriculum.module import DepthModule

    names = ("flash", "cudnn", "mem_efficient", "math")
    before = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in names}
    seen = {}
    real_loss = train_step.Step.loss

    def loss(self, batch, compiled=True):
        seen.update({n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in names})
        return real_loss(self, batch, compiled)

    monkeypatch.setattr(train_step.Step, "loss", loss)
    module = DepthModule(train_step.recipe_for("tiny"))
    try:
        train_step.use_sdpa_backend("flash")
        assert train_step.count_flops(module, train_step.make_batch(1, 28, 42, torch.device("cpu"))) > 0
        assert seen == dict.fromkeys(names, True)
        assert {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in names} == {
            "flash": True, "cudnn": False, "mem_efficient": False, "math": False}
    finally:
        for n, on in before.items():
            getattr(torch.backends.cuda, f"enable_{n}_sdp")(on)


def _gpu_session(tmp_path, deadline: int) -> tuple[subprocess.CompletedProcess, Path]:
    """benchmarks/gpu_session.sh with the smoke overrides it documents: tiny CPU runs of every part."""
    out = tmp_path / "gpu"
    env = dict(os.environ, OUT=str(out), DEADLINE=str(deadline), WHEELS=str(tmp_path / "no-wheels"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               TRAIN_STEP_ARGS="--encoders tiny --size 28x42 --batch 2 --steps 1 --warmup 1 --modes bf16 --device cpu",
               DATA_ARGS=f"--frames 4 --width 124 --height 38 --crop 42 --batch 2 --workers 0 --batches 1 "
                         f"--ref-batches 1 --repeats 1 --cache {tmp_path / 'cache'}",
               PYTEST_ARGS="-k cuda")
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh")], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_gpu_session_script_runs_every_part(tmp_path):
    proc, out = _gpu_session(tmp_path, deadline=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("vitl", "cuda_tests", "vits_vitb", "data_pipeline"):
        assert f"== {name}: exit 0 after" in proc.stdout, proc.stdout
    vitl = json.loads((out / "train_step_vitl.json").read_text())
    assert [(r["encoder"], r["mode"]) for r in vitl["rows"]] == [("tiny", "bf16")]  # the overrides won
    assert vitl["rows"][0]["trainer_img_per_s"] > 0  # the script's --trainer reached the benchmark
    assert json.loads((out / "data_pipeline.json").read_text())["rows"][0]["workers"] == 0
    assert "skipped" in (out / "cuda_tests.log").read_text()  # CUDA-only tests skip on the CPU


def test_gpu_session_script_skips_what_the_deadline_leaves_no_time_for(tmp_path):
    proc, out = _gpu_session(tmp_path, deadline=20)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("vitl", "cuda_tests", "vits_vitb", "data_pipeline"):
        assert f"== {name}: skipped" in proc.stdout, proc.stdout
    assert not (out / "train_step_vitl.json").exists()
