"""Every speed switch keeps the training loss: identical in fp32, within bf16 noise under bf16.

Tiny model, fixed seed, a fixed batch, the 80 m mask policy and ``compute_loss`` as training uses
them; the reference is the plain fp32 eager step.
"""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from curriculum.checkpoint import model_state
from curriculum.data import IMAGENET_MEAN, IMAGENET_STD, crop_resize, normalize_images
from curriculum.losses import compute_loss
from curriculum.masks import MaxDepthPolicy
from curriculum.model import build_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

H, W = 56, 84
POLICY = MaxDepthPolicy(min_depth=1e-3, max_depth=80.0)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model({"encoder": "tiny", "head": "log", "min_depth": 0.1, "max_depth": 1000.0})
    return model.train()


def _batch(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (b, 3, H, W), generator=g, dtype=torch.uint8)
    rows = torch.linspace(120.0, 2.0, H)[None, :, None].repeat(b, 1, W)
    depth = rows * (0.8 + 0.4 * torch.rand(b, 1, 1, generator=g))
    sky = torch.zeros(b, H, W, dtype=torch.bool)
    sky[:, : H // 6] = True
    depth[sky] = float("inf")
    depth[:, -2:, :5] = 0.0
    return {"image": image, "depth": depth, "sky": sky, "no_measurement": depth <= 0}


def _loss(model, batch, images=None, autocast: bool = False):
    x = normalize_images(batch["image"]) if images is None else images
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pred = model(x)
        weight, target = POLICY(batch["depth"], batch["sky"], batch["no_measurement"])
        loss = compute_loss(pred, target, weight)["loss"]
    return loss, pred


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss, pred = _loss(model, batch, **kw)
    loss.backward()
    return loss.detach(), pred, _grads(model)


@pytest.fixture(scope="module")
def reference():
    model, batch = _model(), _batch()
    loss, pred, grads = _loss_and_grads(model, batch)
    assert torch.isfinite(loss) and loss > 0
    return model, batch, loss, grads


def _assert_grads_close(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_channels_last_head_same_loss_and_grads(reference):
    model, batch, loss, grads = reference
    cl = copy.deepcopy(model)
    cl.depth_head.to(memory_format=torch.channels_last)
    images = normalize_images(batch["image"]).contiguous(memory_format=torch.channels_last)
    got, _, got_grads = _loss_and_grads(cl, batch, images=images)
    assert cl.depth_head.scratch.output_conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-7)
    _assert_grads_close(got_grads, grads, rtol=1e-4, atol=1e-6)


def test_matmul_resize_same_loss_and_grads(reference):
    """The head's upsampling as matrix products (the CUDA default) against F.interpolate."""
    model, batch, loss, grads = reference
    mm = copy.deepcopy(model)
    mm.matmul_resize = True
    mm.depth_head.to(memory_format=torch.channels_last)
    got, _, got_grads = _loss_and_grads(mm, batch)
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-7)
    _assert_grads_close(got_grads, grads, rtol=1e-4, atol=1e-6)
    got_bf16, pred, _ = _loss_and_grads(mm, batch, autocast=True)
    assert pred.depth.dtype == torch.float32
    assert abs(float(got_bf16) - float(loss)) / float(loss) < 2e-2


def test_grad_checkpointing_identical_loss_and_grads(reference, monkeypatch):
    import curriculum.model as model_module

    model, batch, loss, grads = reference
    ck = copy.deepcopy(model)
    ck.set_grad_checkpointing(True)
    calls = []
    real = model_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counting)
    got, _, got_grads = _loss_and_grads(ck, batch)
    assert calls, "activation checkpointing did not engage"
    torch.testing.assert_close(got, loss, rtol=0, atol=0)
    _assert_grads_close(got_grads, grads, rtol=0, atol=0)


def test_bf16_autocast_within_bf16_noise(reference):
    model, batch, loss, grads = reference
    got, pred, _ = _loss_and_grads(model, batch, autocast=True)
    assert pred.depth.dtype == torch.float32, "final activation must run in fp32"
    assert got.dtype == torch.float32, "loss must be computed in fp32"
    rel = abs(float(got) - float(loss)) / float(loss)
    assert rel < 2e-2, f"bf16 loss {float(got):.6f} vs fp32 {float(loss):.6f} (rel {rel:.2e})"
    assert rel > 0, "autocast did not engage"


def test_compile_graph_capture_identical(reference):
    """Dynamo capture alone (eager backend) must not change a number; quick enough for every run."""
    model, batch, loss, grads = reference
    torch._dynamo.reset()
    model.sum_projection = False  # compiled, the last 1x1 convolutions would otherwise run as sums
    try:
        compiled = torch.compile(model, backend="eager")
        model.zero_grad(set_to_none=True)
        got, _ = _loss(compiled, batch)
        got.backward()
    finally:
        model.sum_projection = None
    torch.testing.assert_close(got.detach(), loss, rtol=0, atol=0)
    _assert_grads_close(_grads(model), grads, rtol=0, atol=0)
    assert not any("_orig_mod" in k for k in model.state_dict())


@pytest.mark.slow
def test_compile_inductor_same_loss(reference):
    """The real compiler (inductor, minutes on a small CPU): loss within 1e-5, gradients close."""
    model, batch, loss, grads = reference
    torch._dynamo.reset()
    compiled = torch.compile(model)
    model.zero_grad(set_to_none=True)
    got, _ = _loss(compiled, batch)
    got.backward()
    assert abs(float(got) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))
    _assert_grads_close(_grads(model), grads, rtol=1e-3, atol=1e-5)


def test_uint8_transfer_normalisation_matches_float64_host():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 28, 42), generator=g, dtype=torch.uint8)
    images[0, :, 0, 0] = 0
    images[0, :, 0, 1] = 255
    mean = np.array(IMAGENET_MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD, dtype=np.float64).reshape(1, 3, 1, 1)
    host = ((images.numpy().astype(np.float64) / 255.0 - mean) / std).astype(np.float32)
    got = normalize_images(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(host), rtol=0, atol=1e-6)
    # channels-last input (what the recipe's transfer produces) gives the same values
    cl = normalize_images(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, got, rtol=0, atol=0)


def _frame(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    depth = (np.arange(h * w, dtype=np.float32).reshape(h, w) + 1.0)  # every pixel its own value
    sky = rng.random((h, w)) < 0.3
    return rgb, depth, sky


def _crop_offsets(seed, h, w, ch, cw):
    rng = np.random.default_rng(seed)
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))


@pytest.mark.parametrize("seed", range(5))
def test_crop_before_resize_equals_resize_then_crop_at_exact_scale(seed):
    """Scale 2: crop-first (ours) and whole-frame resize then crop (the reference) give the same
    depth and sky pixel for pixel, and the same image away from the crop border."""
    h, w, out = 20, 61, 40
    rgb, depth, sky = _frame(h, w, seed)
    r, d, s = crop_resize(rgb, depth, sky, out, out, np.random.default_rng(seed), scale_jitter=0.0, hflip=False)
    y0, x0 = _crop_offsets(seed, h, w, out // 2, out // 2)
    whole = lambda a, interp: cv2.resize(a, (2 * w, 2 * h), interpolation=interp)  # noqa: E731
    d_ref = whole(depth, cv2.INTER_NEAREST)[2 * y0 : 2 * y0 + out, 2 * x0 : 2 * x0 + out]
    s_ref = whole(sky.view(np.uint8), cv2.INTER_NEAREST)[2 * y0 : 2 * y0 + out, 2 * x0 : 2 * x0 + out].astype(bool)
    r_ref = whole(rgb, cv2.INTER_CUBIC)[2 * y0 : 2 * y0 + out, 2 * x0 : 2 * x0 + out]
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(r[4:-4, 4:-4], r_ref[4:-4, 4:-4])  # the cubic kernel reaches 2 source pixels


@pytest.mark.parametrize("seed", range(5))
def test_crop_before_resize_same_support_at_kitti_scale(seed):
    """vKITTI2 proportions (x1.381 up-scale): the crop covers a contiguous source window of the
    right size, depth is only ever copied (never interpolated), and flips move all maps together."""
    h, w, out = 75, 248, 104
    rgb, depth, sky = _frame(h, w, seed)
    r, d, s = crop_resize(rgb, depth, sky, out, out, np.random.default_rng(seed), scale_jitter=0.0, hflip=False)
    scale = max(out / h, out / w)
    ch = cw = round(out / scale)
    y0, x0 = _crop_offsets(seed, h, w, ch, cw)
    rows, cols = np.unique((d.astype(np.int64) - 1) // w), np.unique((d.astype(np.int64) - 1) % w)
    np.testing.assert_array_equal(rows, np.arange(y0, y0 + ch))
    np.testing.assert_array_equal(cols, np.arange(x0, x0 + cw))
    assert np.isin(d, depth).all()
    # the reference: whole frame resized, then cropped at the matching offset, covers as many
    # source rows/columns (within one on each side)
    new_w, new_h = round(w * scale), round(h * scale)
    ref = cv2.resize(depth, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    ry, rx = round(y0 * scale), round(x0 * scale)
    ref = ref[ry : ry + out, rx : rx + out]
    ref_cols = np.unique((ref.astype(np.int64) - 1) % w)
    assert abs(len(ref_cols) - len(cols)) <= 1 and abs(int(ref_cols[0]) - x0) <= 1
    # a flip (same draw order, then the flip draw) mirrors image, depth and sky together
    rf, df, sf = crop_resize(rgb, depth, sky, out, out, np.random.default_rng(seed), scale_jitter=0.0, hflip=True)
    flipped = not np.array_equal(df, d)
    for a, b in ((rf, r), (df, d), (sf, s)):
        np.testing.assert_array_equal(a, b[:, ::-1] if flipped else b)


def test_compile_mode_reaches_the_compiled_model(monkeypatch):
    from curriculum.config import load_recipe, to_plain
    from curriculum.module import DepthModule

    modes = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or real_compile(fn, **kw))
    recipe = to_plain(load_recipe([RECIPES / "finetune.yaml"],
                                  ["model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs"]))
    DepthModule(recipe)
    assert modes == ["max-autotune-no-cudagraphs"]  # one compiled model, for validation and the training step


def test_compiled_module_state_has_no_orig_mod_keys():
    from curriculum.config import load_recipe, to_plain
    from curriculum.module import DepthModule

    recipe = to_plain(load_recipe([RECIPES / "finetune.yaml"], ["model.compile=true", "model.channels_last=true"]))
    module = DepthModule(recipe)
    assert module._forward_model is not module.model  # the compile switch took effect
    sd = module.state_dict()
    assert not any("_orig_mod." in k for k in sd)
    # a state dict taken from a compiled wrapper (what a module holding it would save) is cleaned
    wrapped = {f"model._orig_mod.{k}": v for k, v in module.model.state_dict().items()}
    ckpt = {"state_dict": wrapped}
    module.on_save_checkpoint(ckpt)
    assert not any("_orig_mod." in k for k in ckpt["state_dict"])
    fresh = build_model({k: recipe["model"][k] for k in ("encoder", "head", "min_depth", "max_depth", "uncertainty")})
    fresh.load_state_dict(model_state(ckpt), strict=True)


def test_every_trainable_parameter_gets_a_gradient(reference):
    """So DDP can run with find_unused_parameters=False; the only unused parameters are the
    documented, frozen refinenet4.resConfUnit1."""
    model, batch, _, grads = reference
    unused = {id(p) for p in model.depth_head.unused_parameters()}
    assert unused, "refinenet4.resConfUnit1 is the documented unused block"
    for name, p in model.named_parameters():
        if id(p) in unused:
            assert not p.requires_grad, f"{name} is never used and must be frozen"
            assert name not in grads
        else:
            assert p.requires_grad and name in grads, f"{name} got no gradient"
    # also when the mask is empty (an all-sky crop under the 80 m policy)
    empty = dict(batch, sky=torch.ones_like(batch["sky"]))
    _, _, empty_grads = _loss_and_grads(model, empty)
    assert empty_grads.keys() == grads.keys()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_fused_adamw_matches_foreach(device):
    """optim.fused changes the kernel, not the update. Both optimizers get the same gradients:
    two backward passes may differ in the last bits (atomic adds), and Adam turns a sign flip of
    a tiny gradient into a step of the full learning rate, which would hide what is compared."""
    model, batch = _model().to(device), {k: v.to(device) for k, v in _batch().items()}
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        _loss(model, batch)[0].backward()
        grads.append([p.grad.clone() for p in trained])
    results = []
    for fused in (False, True):
        params = [p.detach().clone().requires_grad_() for p in trained]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused, foreach=not fused)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    moved = max(float((p - q).abs().max()) for p, q in zip(results[0], trained))
    assert moved > 1e-4  # the steps did something
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def _module_and_batch(*overrides: str):
    from curriculum.config import load_recipe, to_plain
    from curriculum.module import DepthModule

    recipe = to_plain(load_recipe([RECIPES / "curriculum.yaml"],
                                  ["model.encoder=tiny", "loss.grad_weight=0.5", *overrides]))
    torch.manual_seed(0)
    module = DepthModule(recipe).train()
    b = _batch()
    batch = {"image": normalize_images(b["image"]), "depth": b["depth"], "sky": b["sky"],
             "no_measurement": b["no_measurement"]}
    return module, batch


def _training_loss_and_grads(module, batch, compiled: bool):
    module.zero_grad(set_to_none=True)
    depth, _, losses = module.training_losses(batch, compiled=compiled)
    losses["loss"].backward()
    return losses, depth, _grads(module.model)


def test_compile_switch_captures_the_model_in_one_graph_and_runs_the_loss_eagerly(compile_backend):
    """Under model.compile the model is traced without graph breaks (one graph); the loss runs
    eagerly after it (traced with the model, its fused reductions failed to compile for CUDA: see
    DepthModule._build_step_callables); the numbers do not change, and a stage switch (another
    mask policy) reuses the graph instead of recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = compile_backend(CompileCounterWithBackend("eager"))
    module, batch = _module_and_batch("model.compile=true")
    module.model.sum_projection = False  # as eager, so capture alone must change no number
    want, want_depth, want_grads = _training_loss_and_grads(module, batch, compiled=False)
    got, got_depth, got_grads = _training_loss_and_grads(module, batch, compiled=True)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: the model did not trace as one"
    traced = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert not any("sqrt" in t for t in traced), "the loss (SiLog's sqrt) is in the compiled graph"
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    torch.testing.assert_close(got_depth, want_depth, rtol=0, atol=0)
    _assert_grads_close(got_grads, want_grads, rtol=0, atol=0)
    module.set_stage(1)  # the 80 m fine-tune policy
    _training_loss_and_grads(module, batch, compiled=True)
    assert counter.frame_count == 1, "a stage switch recompiled the step"


@pytest.mark.slow
def test_compile_inductor_model_and_loss_same_loss():
    """The training step as the compile switch runs it on a GPU (inductor for the model, the loss
    eager, channels-last head, matrix-product resizes): loss within 1e-5 of eager, gradients close."""
    torch._dynamo.reset()
    module, batch = _module_and_batch("model.compile=true", "model.channels_last=true")
    module.model.matmul_resize = True  # what a CUDA compile picks; the CPU would keep F.interpolate
    want, _, want_grads = _training_loss_and_grads(module, batch, compiled=False)
    got, _, got_grads = _training_loss_and_grads(module, batch, compiled=True)
    for k in want:
        g, w = float(got[k].detach()), float(want[k].detach())
        assert abs(g - w) <= 1e-5 * max(1.0, abs(w)), f"{k}: compiled {g} vs eager {w}"
    _assert_grads_close(got_grads, want_grads, rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_module_copies_pickles_and_frees_like_a_plain_one(compile_backend):
    """A deep copy's compiled step runs the copy's weights (as Lightning's weight-averaging
    callbacks copy modules), a pickled module (ddp_spawn, torch.save) comes back with a working
    compiled step, and a dropped module is freed at once (no reference cycle through itself)."""
    import gc
    import pickle
    import weakref

    compile_backend("eager")
    module, batch = _module_and_batch("model.compile=true")
    module.model.sum_projection = False  # as eager, so compiled and eager losses are bit-identical
    copy_ = copy.deepcopy(module)
    with torch.no_grad():
        for p in copy_.model.parameters():
            p.mul_(0.5)
    for m in (module, copy_, pickle.loads(pickle.dumps(module))):
        want = m.training_losses(batch, compiled=False)[2]
        got = m.training_losses(batch, compiled=True)[2]
        torch.testing.assert_close(got["loss"], want["loss"], rtol=0, atol=0)
    assert float(copy_.training_losses(batch)[2]["loss"]) != float(module.training_losses(batch)[2]["loss"])
    ref = weakref.ref(module)
    gc.disable()
    try:
        del module
        assert ref() is None, "the module is only freed by the cycle collector"
    finally:
        gc.enable()
