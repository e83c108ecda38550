"""Training-step throughput: img/s, TFLOP/s and peak memory of our step, per encoder and mode.

The step is the one training runs, built from the same pieces: ``DepthModule`` from the GPU
recipe of the encoder layered over ``recipes/finetune.yaml`` (so channels-last head, fused AdamW
on CUDA with the encoder/head parameter groups, the compile switch and the 80 m mask policy are
the recipe's), then per step: uint8 batch with raw depth -> ``on_after_batch_transfer``
(normalisation and metres on the device) -> mask policy -> model and ``compute_loss``
(``DepthModule.training_losses``) -> backward -> non-finite check -> AdamW step. Lightning's own
bookkeeping (logging, progress bar) is not included.

Modes:
  fp32          eager, fp32 everywhere: the reference-equivalent configuration
  bf16          eager, bf16 autocast (loss and final activation stay fp32), as ``bf16-mixed``
  bf16-compile  as bf16 with the model and loss compiled (the recipe's ``model.compile``)

Each timed step ends with a device synchronisation and throughput comes from the median step
time, so bursts of other jobs on a shared machine do not skew it; that is a lower bound, as the
device idles while the host starts each step. The same number of steps is then also timed
queued back to back with one synchronisation at the end, as training runs them ("queued
img/s"); on CUDA one more step runs under torch's sync debug mode and the table's ``syncs``
column counts the calls in it that made the host wait for the device (0 is what lets queued
steps overlap). With ``--trainer`` the same steps also run through Lightning's loop as
``curriculum train`` builds it (the ``trainer`` column), reusing the compiled graph. FLOPs are
counted once per encoder with ``torch.utils.flop_counter.FlopCounterMode``
on one image (forward + backward, matmuls, convolutions and attention; recomputation under
activation checkpointing not counted), times the batch. On a machine without CUDA it runs the
tiny encoder at a small size so CI keeps it working; compiling is skipped there unless asked for
(inductor needs minutes on two cores).

    python benchmarks/train_step.py                       # CPU: tiny; CUDA: vits, vitb, vitl at 518
    python benchmarks/train_step.py --encoders vitl --batch 16 --modes bf16,bf16-compile
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model  # noqa: E402

from curriculum.config import load_recipe, to_plain  # noqa: E402
from curriculum.module import DepthModule  # noqa: E402
from curriculum.optim import NonFiniteCounter, before_step, clip_gradients, nonfinite_flag, release  # noqa: E402
RECIPES = ROOT / "recipes"
MODES = ("fp32", "bf16", "bf16-compile")
GPU_ENCODERS = ("vits", "vitb", "vitl")
GRAD_CHECKS = ("module", "host", "none")


# ---------------------------------------------------------------------------- FLOPs


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# The CPU attention kernels have no entry in torch's FLOP table; the CUDA ones do.
CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


# ---------------------------------------------------------------------------- set-up


def recipe_for(encoder: str, overrides: list[str] = ()) -> dict:
    """finetune.yaml + gpu_<encoder>.yaml (the tiny encoder borrows gpu_vits.yaml's settings)."""
    gpu = encoder if encoder in GPU_ENCODERS else "vits"
    files = [RECIPES / "finetune.yaml", RECIPES / f"gpu_{gpu}.yaml"]
    return to_plain(load_recipe(files, [f"model.encoder={encoder}", *overrides]))


def make_batch(batch: int, height: int, width: int, device: torch.device, seed: int = 0) -> dict:
    """A batch as the loader delivers it: uint8 images and raw 16-bit depth (centimetres, as int16
    bits) with sky (65535), a far band (> 80 m) and holes (0); metres are made in the step."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)
    rows = torch.linspace(120.0, 2.0, height)[None, :, None].expand(batch, height, width)
    depth = (rows * (0.8 + 0.4 * torch.rand(batch, 1, 1, generator=g))).contiguous()
    raw = torch.round(depth / 0.01).to(torch.int32)
    sky = torch.zeros(batch, height, width, dtype=torch.bool)
    sky[:, : height // 5] = True
    raw[sky] = 65535
    raw[:, -2:, : width // 8] = 0
    return {
        "image": image.to(device),
        "depth_raw": raw.to(torch.int16).to(device),  # the low 16 bits: uint16 as int16
        "depth_scale": torch.full((batch,), 0.01).to(device),
        "sky": sky.to(device),
        "bad_samples": 0,
    }


def _host_check(params, loss) -> bool:
    """The non-finite check decided on the host (``--grad-check host``): one device sync per step,
    as ``DepthModule`` did it before deciding on the device; kept to measure what that costs."""
    return not bool(nonfinite_flag([p.grad for p in params if p.grad is not None], loss))


class Step:
    """One training step of a DepthModule with its optimizer, under a given autocast dtype."""

    def __init__(self, module: DepthModule, autocast_dtype: torch.dtype | None, grad_check: str):
        self.module = module
        self.optimizer = module.configure_optimizers()["optimizer"]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.autocast_dtype = autocast_dtype
        self.grad_check = grad_check
        self.nonfinite = NonFiniteCounter()

    def loss(self, batch: dict, compiled: bool = True) -> torch.Tensor:
        b = self.module.on_after_batch_transfer(dict(batch), 0)
        with self._autocast(b["image"].device.type):
            _, _, losses = self.module.training_losses(b, compiled=compiled)
        return losses["loss"]

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # Lightning's own bf16-mixed context (its weight-cast cache is off): the same autocast state
        # as training, so a compiled step is the graph training compiles, not a near twin.
        from lightning.pytorch.plugins.precision import MixedPrecision

        precision = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[self.autocast_dtype]
        return MixedPrecision(precision, device_type).autocast_context_manager()

    def __call__(self, batch: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        if self.grad_check == "module":  # as DepthModule.optimizer_step (single rank)
            before_step(self.optimizer, self.params, loss, self.nonfinite, self.module.grad_clip)
            self.optimizer.step()
            release(self.optimizer)
        elif self.grad_check == "none" or _host_check(self.params, loss):
            clip_gradients(self.params, self.module.grad_clip)
            self.optimizer.step()
        else:
            self.nonfinite.add(torch.ones(()))
        return loss.detach()

    @property
    def skipped(self) -> int:
        self.nonfinite.sync()
        return self.nonfinite.skipped


def count_flops(module: DepthModule, batch: dict) -> int:
    """Forward + backward FLOPs of one image (eager, fp32)."""
    one = {k: (v[:1] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}
    step = Step(module, None, "none")
    checkpointing, matmul_resize = module.model._grad_checkpointing, module.model.matmul_resize
    module.model.set_grad_checkpointing(False)  # model FLOPs: recomputation is not useful work
    module.model.matmul_resize = False  # the model's FLOPs, not those of the dense resize matrices
    # fp32 attention: a kernel chosen with --sdpa (flash, cudnn) takes half precision only
    backends = ("flash", "cudnn", "mem_efficient", "math")
    enabled = {b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in backends}
    try:
        for b in backends:
            getattr(torch.backends.cuda, f"enable_{b}_sdp")(True)
        with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            step.loss(one, compiled=False).backward()
    finally:
        for b, on in enabled.items():
            getattr(torch.backends.cuda, f"enable_{b}_sdp")(on)
        module.model.set_grad_checkpointing(checkpointing)
        module.model.matmul_resize = matmul_resize
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


SDPA_BACKENDS = {"auto": None, "flash": "flash", "cudnn": "cudnn", "efficient": "mem_efficient", "math": "math"}


def use_sdpa_backend(name: str) -> None:
    """Allow only one scaled-dot-product-attention kernel, process-wide (compiled graphs pick theirs
    when traced, so a context manager around the step would not reach them)."""
    only = SDPA_BACKENDS[name]
    if only is None:
        return
    for backend in ("flash", "cudnn", "mem_efficient", "math"):
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(backend == only)


def count_syncs(step: Step, batch: dict, device: torch.device) -> int | None:
    """Synchronising calls in one step (a blocking copy, ``.item()``, a device sync), counted by
    torch's sync debug mode on CUDA; each drains the device's queue, so queued steps only overlap
    the host with the device when this is 0. None on other devices."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(encoder: str, mode: str, args, device: torch.device, flops_per_image: dict,
             measured=lambda row: None) -> dict:
    """One row; ``measured(row)`` is called once the step figures are in it, before the profile and
    the trainer column, so that a run cut short there keeps them."""
    overrides = [f"model.compile={'true' if mode.endswith('compile') else 'false'}",
                 f"model.grad_checkpointing={'true' if args.grad_checkpointing else 'false'}"]
    if args.compile_mode:
        overrides.append(f"model.compile_mode={args.compile_mode}")
    if args.channels_last is not None:
        overrides.append(f"model.channels_last={'true' if args.channels_last else 'false'}")
    recipe = recipe_for(encoder, overrides)
    batch_size = args.batch or (recipe["data"]["batch_size"] if device.type == "cuda" else 2)
    row = {"encoder": encoder, "mode": mode, "batch": batch_size, "size": [args.height, args.width],
           "channels_last": bool(recipe["model"]["channels_last"]), "compile_mode": recipe["model"]["compile_mode"],
           "grad_checkpointing": bool(recipe["model"]["grad_checkpointing"]),
           "fused_adamw": bool(recipe["optim"]["fused"]) and device.type == "cuda", "grad_check": args.grad_check}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(recipe["trainer"]["cudnn_benchmark"]) and not args.no_cudnn_benchmark
    row["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    torch.manual_seed(args.seed)
    module = DepthModule(recipe).to(device)
    module.model.matmul_resize = {"auto": None, "matmul": True, "interpolate": False}[args.resize]
    auto_matmul = device.type == "cuda" and mode.endswith("compile")  # DepthModel's own choice
    row["resize"] = "matmul" if args.resize == "matmul" or (args.resize == "auto" and auto_matmul) else "interpolate"
    module.train()
    batch = make_batch(batch_size, args.height, args.width, device, seed=args.seed)
    if encoder not in flops_per_image:
        flops_per_image[encoder] = count_flops(module, batch)
    step = Step(module, torch.bfloat16 if mode.startswith("bf16") else None, args.grad_check)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    first_loss = float(step(batch))  # compiles in compile mode
    _sync(device)
    row["first_step_s"] = time.perf_counter() - t0
    for _ in range(max(0, args.warmup - 1)):
        step(batch)
    _sync(device)
    times = []
    for _ in range(args.steps):  # each step timed on its own: the median shrugs off other jobs' bursts
        t0 = time.perf_counter()
        loss = step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    syncs = count_syncs(step, batch, device)
    _sync(device)  # the counted step is still queued: the window below must not hold it
    # The same steps queued back to back, one synchronisation at the end, as training runs them
    # (no per-step sync): the host prepares step k + 1 while the device still runs step k.
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(batch)
    _sync(device)
    queued = (time.perf_counter() - t0) / args.steps
    row.update(
        first_loss=first_loss,
        last_loss=float(loss),
        steps=args.steps,
        step_s=median,
        step_s_mean=float(np.mean(times)),
        img_per_s=batch_size / median,
        queued_step_s=queued,
        queued_img_per_s=batch_size / queued,
        syncs_per_step=syncs,
        flops_per_image=flops_per_image[encoder],
        tflops_per_s=flops_per_image[encoder] * batch_size / median / 1e12,
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        # what the caching allocator held: the card needs this (plus the CUDA context), not the above
        peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        skipped_steps=step.skipped,
    )
    measured(row)
    if (encoder, mode) in args.profile:
        row["profile"] = profile_steps(step, batch, device, args.profile_steps)
    if args.trainer:
        step.optimizer.state.clear()  # Lightning builds its own optimizer: room for its AdamW state
        try:
            row["trainer_img_per_s"] = trainer_rate(module, batch, args, device, mode)
        except Exception as exc:  # keep the step figures measured above
            row["trainer_error"] = _failure(exc)
    del step, module, batch
    return row


def _failure(exc: Exception) -> str:
    """A failure's first line for the row (its traceback goes to stderr)."""
    traceback.print_exc(limit=3)
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {msg[:200]}"


class _RepeatBatch(torch.utils.data.IterableDataset):
    """One host batch, forever: what a loader that always keeps up would hand Lightning."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield dict(self.batch)


def trainer_rate(module: DepthModule, batch: dict, args, device: torch.device, mode: str) -> float:
    """img/s of the same steps run by Lightning's loop as ``curriculum train`` builds it
    (``build_trainer``: its callbacks, per-step logging to metrics.csv, the learning-rate schedule,
    the batch moved from pinned host memory), timed from the end of the warm-up steps to the
    last step's end with one device sync at each; no data loading, validation or checkpoint."""
    import copy
    import tempfile

    import lightning.pytorch as pl

    from curriculum.faults import SignalCheckpoint
    from curriculum.train import build_trainer, make_loggers, quiet_lightning_notices

    total = args.warmup + args.steps
    recipe = copy.deepcopy(module.recipe)
    recipe["stages"] = [dict(recipe["stages"][0], steps=total, rewarm_steps=0)]
    recipe["logging"]["mode"] = "disabled"  # metrics.csv only
    on_gpu = device.type == "cuda"
    recipe["trainer"].update(accelerator="gpu" if on_gpu else "cpu", devices=[device.index or 0] if on_gpu else 1,
                             num_nodes=1, strategy="auto",
                             precision="bf16-mixed" if mode.startswith("bf16") else "32-true",
                             progress=False, val_every_steps=0, ckpt_every_steps=10**9,
                             cudnn_benchmark=bool(torch.backends.cudnn.benchmark))  # as the step figures ran
    host = {k: (v.cpu().pin_memory() if on_gpu else v.cpu()) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
    loader = torch.utils.data.DataLoader(_RepeatBatch(host), batch_size=None)
    times = {}

    class Clock(pl.Callback):
        # From the end of the last warm-up step, so the window holds exactly `steps` steps, each
        # with its batch transfer (Lightning moves a batch before on_train_batch_start).
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (args.warmup, total):
                _sync(device)
                times["start" if trainer.global_step == args.warmup else "end"] = time.perf_counter()

    # no depth panel at step 0: drawing it syncs and would write a PNG under the recipe's run folder
    panels, module.recipe["logging"]["image_every_steps"] = module.recipe["logging"]["image_every_steps"], 0
    try:
        with tempfile.TemporaryDirectory(prefix="train_step-") as out:
            with quiet_lightning_notices():
                # the steps alone are timed: no validation loader, on purpose
                warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
                trainer = build_trainer(recipe, Path(out), make_loggers(recipe, Path(out)))
                # a time limit's SIGTERM ends the benchmark, not in a checkpoint of several GB
                trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, SignalCheckpoint)]
                trainer.callbacks.append(Clock())
                trainer.fit(module, train_dataloaders=loader)
    finally:
        module.recipe["logging"]["image_every_steps"] = panels
        module.to(device)  # Lightning's teardown moves the module to the CPU
    return args.steps * batch["image"].shape[0] / (times["end"] - times["start"])


def profile_steps(step: Step, batch: dict, device: torch.device, steps: int) -> str:
    """The top operators/kernels of a few steps by device time (self), as a text table, then the
    top operators by input shapes (which tensors the copies and convolutions outside the
    compiled kernels touch)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step(batch)
        _sync(device)
    tables = []
    for events, width in ((prof.key_averages(), 90), (prof.key_averages(group_by_input_shape=True), 60)):
        for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
            try:
                tables.append(events.table(sort_by=key, row_limit=40, max_name_column_width=width,
                                           max_shapes_column_width=120))
                break
            except (AttributeError, KeyError, ValueError, TypeError):
                continue
        else:
            tables.append(events.table(row_limit=40))
    return "\n\nby input shapes:\n".join(tables)


def format_table(rows: list[dict]) -> str:
    head = (f"{'encoder':<7} {'mode':<13} {'batch':>5} {'img/s':>8} {'queued':>8} {'trainer':>8} {'TFLOP/s':>8} {'step ms':>8} "
            f"{'peak GiB':>8} {'reserved':>8} {'1st step s':>10} {'resize':>11} {'syncs':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            note = r.get("error") or r.get("skipped")
            lines.append(f"{r['encoder']:<7} {r['mode']:<13} {r.get('batch', '-')!s:>5}  {note}")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        reserved = f"{r['peak_reserved_gib']:.1f}" if r.get("peak_reserved_gib") is not None else "-"
        tf = r["tflops_per_s"]
        tflops = f"{tf:>8.2f}" if tf >= 0.01 else f"{tf:>8.1e}"
        lines.append(
            f"{r['encoder']:<7} {r['mode']:<13} {r['batch']:>5} {r['img_per_s']:>8.2f} "
            f"{r.get('queued_img_per_s', float('nan')):>8.2f} "
            f"{'-' if r.get('trainer_img_per_s') is None else format(r['trainer_img_per_s'], '8.2f'):>8} {tflops} "
            f"{r['step_s'] * 1e3:>8.1f} {mem:>8} {reserved:>8} {r['first_step_s']:>10.1f} {r.get('resize', '-'):>11} "
            f"{'-' if r.get('syncs_per_step') is None else r['syncs_per_step']:>5}"
        )
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", type=_list, default=None, help="default: vits,vitb,vitl on CUDA, tiny on CPU")
    ap.add_argument("--modes", type=_list, default=None,
                    help=f"subset of {','.join(MODES)} (default: all on CUDA, fp32,bf16 on CPU)")
    ap.add_argument("--size", type=_size, default=None, help="HxW or S (default 518 on CUDA, 140 on CPU)")
    ap.add_argument("--batch", type=int, default=0, help="default: the GPU recipe's data.batch_size; 2 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA and CPU)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the encoder")
    ap.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                    help="force the channels-last head on (default: the recipe's setting)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--grad-check", choices=GRAD_CHECKS, default="module",
                    help="non-finite check before the optimizer step: 'module' as DepthModule does it (on the "
                         "device with fused AdamW), 'host' decided on the host (a sync per step), or 'none'")
    ap.add_argument("--resize", choices=("auto", "matmul", "interpolate"), default="auto",
                    help="the head's upsampling: auto = the model's choice (matrix products when compiled for "
                         "CUDA, curriculum.layers), or force one")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave cuDNN's algorithm search off (default: the recipe's trainer.cudnn_benchmark)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in fp32 mode (off: the reference)")
    ap.add_argument("--sdpa", choices=tuple(SDPA_BACKENDS), default="auto",
                    help="the only attention kernel allowed (auto: torch's choice, cuDNN on H100/H200)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the compiled modes (model.compile_mode; default: the recipe's)")
    ap.add_argument("--trainer", action="store_true",
                    help="also time the steps through Lightning's loop as `curriculum train` builds it (the "
                         "'trainer' column)")
    ap.add_argument("--profile", type=_list, default=[],
                    help="encoder:mode pairs to profile after timing (e.g. vitl:bf16-compile); tables go to "
                         "--profile-out")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--profile-out", type=Path, default=None, help="default: next to --json, .profile.txt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "train_step.json",
                    help="result file (default runs/bench/train_step.json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    encoders = args.encoders or (list(GPU_ENCODERS) if on_gpu else ["tiny"])
    modes = args.modes or (list(MODES) if on_gpu else ["fp32", "bf16"])
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    args.height, args.width = args.size or ((518, 518) if on_gpu else (140, 140))
    args.steps = args.steps or (10 if on_gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else 3
    args.warmup = max(1, args.warmup)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    use_sdpa_backend(args.sdpa)
    try:
        args.profile = {tuple(p.split(":", 1)) for p in args.profile}
    except ValueError:
        ap.error("--profile takes encoder:mode pairs")
    if any(len(p) != 2 for p in args.profile):
        ap.error("--profile takes encoder:mode pairs")

    rows: list[dict] = []
    flops: dict[str, int] = {}
    for encoder in encoders:
        for mode in modes:
            print(f"  {encoder} {mode} ...", flush=True)

            def measured(row):  # the step figures, written before the slower trainer column
                rows.append(row)
                print(f"    {row['img_per_s']:.1f} img/s ({row['queued_img_per_s']:.1f} queued), "
                      f"{row['tflops_per_s']:.3g} TFLOP/s, first step {row['first_step_s']:.1f} s, "
                      f"loss {row['first_loss']:.5f}", flush=True)
                write_result(args, device, encoders, modes, rows)

            before = len(rows)
            try:
                row = run_mode(encoder, mode, args, device, flops, measured)
            except Exception as exc:  # one failing mode (OOM, compiler) must not lose the others
                # a failure after the step figures (the profile) keeps them in their row
                row = rows[-1] if len(rows) > before else {"encoder": encoder, "mode": mode}
                row["error"] = _failure(exc)
            if len(rows) == before:
                rows.append(row)
            if "trainer_img_per_s" in row:
                print(f"    {row['trainer_img_per_s']:.1f} img/s through the trainer", flush=True)
            write_result(args, device, encoders, modes, rows)  # a later crash or timeout keeps these rows
            if mode.endswith("compile"):
                torch._dynamo.reset()  # drop the compiled graphs of a model that is gone
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    if not on_gpu and args.modes is None:
        rows.append({"encoder": ",".join(encoders), "mode": "bf16-compile",
                     "skipped": "not run on CPU by default (inductor compile takes minutes here); --modes to ask"})

    result = write_result(args, device, encoders, modes, rows)
    print(f"\nTraining step, {args.height}x{args.width}, {result['machine']['device']}")
    print(result["table"])
    if args.json:
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


def write_result(args, device: torch.device, encoders: list[str], modes: list[str], rows: list[dict]) -> dict:
    on_gpu = device.type == "cuda"
    table = format_table(rows)
    result = {
        "benchmark": "train_step",
        "date": _dt.date.today().isoformat(),
        "machine": {
            "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU: {cpu_model()}",
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "numpy": np.__version__},
        "config": {"encoders": encoders, "modes": modes, "size": [args.height, args.width],
                   "steps": args.steps, "warmup": args.warmup, "grad_check": args.grad_check,
                   "tf32": bool(args.tf32), "grad_checkpointing": bool(args.grad_checkpointing),
                   "resize": args.resize, "no_cudnn_benchmark": bool(args.no_cudnn_benchmark),
                   "fused_sdpa": _fused_attn(), "sdpa": args.sdpa, "trainer": bool(args.trainer),
                   "compile_mode": args.compile_mode},
        "rows": [{k: v for k, v in r.items() if k != "profile"} for r in rows],
        "table": table,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    profiles = [r for r in rows if "profile" in r]
    if profiles and (args.profile_out or args.json):
        out = args.profile_out or args.json.with_suffix(".profile.txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"== {r['encoder']} {r['mode']} batch {r['batch']}, {args.profile_steps} steps\n"
                               f"{r['profile']}\n\n" for r in profiles))
    return result


def _fused_attn() -> bool:
    try:
        from timm.layers import use_fused_attn

        return bool(use_fused_attn())
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
