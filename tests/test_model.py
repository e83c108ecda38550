import math

import pytest
import torch
import torch.nn.functional as F

from curriculum.model import (
    ENCODER_SPECS,
    PATCH,
    DepthModel,
    DepthPrediction,
    build_model,
    load_encoder_weights,
    load_official,
    official_state_dict,
)


def _tiny(head="sigmoid", uncertainty=False, max_depth=80.0, seed=0):
    torch.manual_seed(seed)
    return DepthModel("tiny", head, 1e-3, max_depth, uncertainty=uncertainty)


def _set_constant_logit(model: DepthModel, logit: float) -> None:
    final = model.depth_head.scratch.output_conv2[2]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(logit)


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Random non-trivial values everywhere (layer scales and norms included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("head", ["sigmoid", "log"])
@pytest.mark.parametrize("uncertainty", [False, True])
def test_tiny_forward_shapes(head, uncertainty):
    model = _tiny(head, uncertainty, max_depth=80.0 if head == "sigmoid" else 1000.0)
    x = torch.randn(2, 3, 126, 378)
    out = model(x)
    assert isinstance(out, DepthPrediction)
    assert out.depth.shape == (2, 126, 378) and out.depth.dtype == torch.float32
    assert torch.isfinite(out.depth).all() and (out.depth > 0).all()
    if uncertainty:
        assert out.uncertainty.shape == (2, 126, 378) and out.uncertainty.dtype == torch.float32
        assert (out.uncertainty > 0).all()
    else:
        assert out.uncertainty is None


def test_non_multiple_of_14_rejected():
    with pytest.raises(ValueError, match="multiple of 14"):
        _tiny()(torch.randn(1, 3, 130, 378))


def test_sigmoid_head_bounded_by_max_depth():
    model = _tiny("sigmoid", max_depth=80.0).eval()
    _set_constant_logit(model, 50.0)
    with torch.no_grad():
        depth = model(torch.randn(1, 3, 56, 56)).depth
    assert (depth <= 80.0).all() and depth.max().item() == pytest.approx(80.0)
    _set_constant_logit(model, 0.0)
    with torch.no_grad():
        assert torch.allclose(model(torch.randn(1, 3, 56, 56)).depth, torch.full((1, 56, 56), 40.0))


def _logit_for_depth(depth, lo, hi):
    s = (math.log(depth) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.log(s / (1 - s))


def test_log_head_covers_sky_far_target():
    model = DepthModel("tiny", "log", 1e-3, 1000.0).eval()
    x = torch.randn(1, 3, 56, 56)
    _set_constant_logit(model, _logit_for_depth(655.35, 1e-3, 1000.0))
    with torch.no_grad():
        depth = model(x).depth
        assert torch.allclose(depth, torch.full_like(depth, 655.35), rtol=1e-5)
        _set_constant_logit(model, 40.0)
        assert model(x).depth.max().item() == pytest.approx(1000.0, rel=1e-5)
        _set_constant_logit(model, -40.0)
        assert model(x).depth.min().item() == pytest.approx(1e-3, rel=1e-4)


def test_final_activation_fp32_under_bf16_autocast():
    model = DepthModel("tiny", "log", 1e-3, 1000.0, uncertainty=True).eval()
    target = 655.35
    logit = _logit_for_depth(target, 1e-3, 1000.0)
    _set_constant_logit(model, logit)
    # bf16 would round this logit by up to 0.4 %, which the log head's exp turns into percents.
    assert abs(torch.tensor(logit).bfloat16().float().item() - logit) > 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 56, 56))
    assert out.depth.dtype == torch.float32 and out.uncertainty.dtype == torch.float32
    assert torch.allclose(out.depth, torch.full_like(out.depth, target), rtol=1e-5)


def test_grad_checkpointing_same_output_and_grads():
    model = _tiny(uncertainty=True).train()
    x = torch.randn(2, 3, 56, 84)

    def run():
        model.zero_grad()
        out = model(x)
        (out.depth.mean() + out.uncertainty.mean()).backward()
        return out.depth.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    d0, g0 = run()
    model.set_grad_checkpointing(True)
    d1, g1 = run()
    model.set_grad_checkpointing(False)
    assert torch.allclose(d0, d1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


# ------------------------------------------------------------------------- structure, all sizes


OFFICIAL_LAYERS = {"vits": (2, 5, 8, 11), "vitb": (2, 5, 8, 11), "vitl": (4, 11, 17, 23)}
OFFICIAL_WIDTHS = {
    "vits": (384, 12, 64, (48, 96, 192, 384)),
    "vitb": (768, 12, 128, (96, 192, 384, 768)),
    "vitl": (1024, 24, 256, (256, 512, 1024, 1024)),
}
# Parameter counts of the official modules (those of the Depth-Anything-V2 paper: 24.8M, 97.5M,
# 335.3M), minus the mask token this model does not have.
OFFICIAL_PARAMS = {"vits": 24_785_089, "vitb": 97_470_785, "vitl": 335_315_649}


@pytest.mark.parametrize("encoder", ["vits", "vitb", "vitl"])
def test_real_sizes_structure(encoder):
    with torch.device("meta"):  # no memory, no init cost; nothing runs
        model = DepthModel(encoder, "sigmoid", 1e-3, 80.0)
    dim, depth, features, out_channels = OFFICIAL_WIDTHS[encoder]
    assert model.layers == OFFICIAL_LAYERS[encoder]
    assert model.encoder.embed_dim == dim and len(model.encoder.blocks) == depth
    assert model.encoder.patch_embed.proj.kernel_size == (14, 14)
    assert tuple(model.encoder.pos_embed.shape) == (1, 37 * 37 + 1, dim)
    head = model.depth_head
    assert tuple(p.out_channels for p in head.projects) == out_channels
    assert all(p.in_channels == dim for p in head.projects)
    assert head.scratch.layer1_rn.out_channels == features
    assert head.scratch.output_conv1.out_channels == features // 2
    total = sum(p.numel() for p in model.parameters())
    assert total + dim == OFFICIAL_PARAMS[encoder]
    enc = sum(p.numel() for p in model.encoder_parameters())
    head_n = sum(p.numel() for p in model.head_parameters())
    unused = sum(p.numel() for p in model.depth_head.unused_parameters())
    assert enc + head_n + unused == total
    assert enc == sum(p.numel() for p in model.pretrained.parameters())


def test_tiny_spec():
    spec = ENCODER_SPECS["tiny"]
    model = _tiny()
    assert model.layers == spec.layers == (0, 1, 2, 3)
    assert model.encoder.embed_dim == 64 and len(model.encoder.blocks) == 4
    assert model.encoder.patch_embed.proj.kernel_size == (14, 14)


# The official vits metric checkpoint layout, from the structure of depth_anything_v2/dpt.py,
# util/blocks.py and dinov2.py (img_size 518, init_values 1.0 -> ls1/ls2, block_chunks 0).
VITS_OFFICIAL_SAMPLE = {
    "pretrained.cls_token": (1, 1, 384),
    "pretrained.pos_embed": (1, 1370, 384),
    "pretrained.mask_token": (1, 384),
    "pretrained.patch_embed.proj.weight": (384, 3, 14, 14),
    "pretrained.patch_embed.proj.bias": (384,),
    "pretrained.blocks.0.norm1.weight": (384,),
    "pretrained.blocks.0.attn.qkv.weight": (1152, 384),
    "pretrained.blocks.0.attn.proj.bias": (384,),
    "pretrained.blocks.0.ls1.gamma": (384,),
    "pretrained.blocks.11.mlp.fc1.weight": (1536, 384),
    "pretrained.blocks.11.mlp.fc2.weight": (384, 1536),
    "pretrained.blocks.11.ls2.gamma": (384,),
    "pretrained.norm.weight": (384,),
    "pretrained.norm.bias": (384,),
    "depth_head.projects.0.weight": (48, 384, 1, 1),
    "depth_head.projects.3.bias": (384,),
    "depth_head.resize_layers.0.weight": (48, 48, 4, 4),
    "depth_head.resize_layers.1.weight": (96, 96, 2, 2),
    "depth_head.resize_layers.3.weight": (384, 384, 3, 3),
    "depth_head.scratch.layer1_rn.weight": (64, 48, 3, 3),
    "depth_head.scratch.layer4_rn.weight": (64, 384, 3, 3),
    "depth_head.scratch.refinenet1.out_conv.weight": (64, 64, 1, 1),
    "depth_head.scratch.refinenet4.resConfUnit1.conv1.weight": (64, 64, 3, 3),
    "depth_head.scratch.refinenet2.resConfUnit2.conv2.bias": (64,),
    "depth_head.scratch.output_conv1.weight": (32, 64, 3, 3),
    "depth_head.scratch.output_conv2.0.weight": (32, 32, 3, 3),
    "depth_head.scratch.output_conv2.2.weight": (1, 32, 1, 1),
    "depth_head.scratch.output_conv2.2.bias": (1,),
}


def test_vits_official_key_layout():
    with torch.device("meta"):
        model = DepthModel("vits", "sigmoid", 1e-3, 80.0)
    sd = official_state_dict(model)
    pre = [k for k in sd if k.startswith("pretrained.")]
    head = [k for k in sd if k.startswith("depth_head.")]
    # 5 embedding tensors + 12 blocks x 14 + final norm 2; head: projects 8, resize 6,
    # layerN_rn 4 (no bias), 4 refinenets x 10, output_conv1 2, output_conv2 4.
    assert len(pre) == 5 + 12 * 14 + 2 == 175
    assert len(head) == 8 + 6 + 4 + 40 + 2 + 4 == 64
    assert len(sd) == 239
    for k, shape in VITS_OFFICIAL_SAMPLE.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("resize_layers.2" in k or "bias" in k and "_rn." in k for k in sd)


def test_official_state_dict_roundtrip_tiny(tmp_path):
    model = _tiny(max_depth=80.0).eval()
    _perturb(model)
    path = tmp_path / "official.pth"
    torch.save(official_state_dict(model), path)
    loaded = load_official(path, "tiny", 80.0)
    assert not loaded.training and loaded.head == "sigmoid" and loaded.max_depth == 80.0
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        a, b = model(x).depth, loaded(x).depth
    assert ((a - b).abs() / a.abs()).max() < 1e-4
    # Also through the {"model": sd} wrapper, a DDP prefix and encoder inference.
    wrapped = {"model": {f"module.{k}": v for k, v in official_state_dict(model).items()}}
    torch.save(wrapped, path)
    again = load_official(path, None, 80.0)
    assert again.encoder_name == "tiny"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in again.state_dict().items())


@pytest.mark.slow  # about 10 s on two CPU cores
def test_official_state_dict_roundtrip_vits(tmp_path):
    torch.manual_seed(0)
    model = DepthModel("vits", "sigmoid", 1e-3, 80.0).eval()
    path = tmp_path / "vits.pth"
    torch.save({"state_dict": official_state_dict(model)}, path)
    loaded = load_official(path, "vits", 80.0)
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        a, b = model(x).depth, loaded(x).depth
    assert a.shape == (1, 518, 518)
    assert ((a - b).abs() / a.abs()).max() < 1e-4


def test_load_official_reports_bad_keys():
    model = _tiny()
    sd = official_state_dict(model)
    missing = {k: v for k, v in sd.items() if k != "depth_head.scratch.output_conv1.weight"}
    with pytest.raises(ValueError, match=r"missing keys: depth_head\.scratch\.output_conv1\.weight"):
        load_official(missing, "tiny", 80.0)
    extra = dict(sd, **{"depth_head.scratch.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: depth_head\.scratch\.extra\.weight"):
        load_official(extra, "tiny", 80.0)
    wrong = dict(sd, **{"depth_head.projects.0.weight": torch.zeros(5, 64, 1, 1)})
    with pytest.raises(ValueError, match=r"shape mismatches: depth_head\.projects\.0\.weight"):
        load_official(wrong, "tiny", 80.0)
    # The mask token is optional and, when present, reported rather than loaded.
    no_mask = {k: v for k, v in sd.items() if k != "pretrained.mask_token"}
    load_official(no_mask, "tiny", 80.0)


# ----------------------------------------------------------------------- encoder-only loading


def _encoder_equal(a: DepthModel, b: DepthModel) -> bool:
    sa, sb = a.pretrained.state_dict(), b.pretrained.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_encoder_weights_timm_layout():
    src, dst = _tiny(seed=1), _tiny(seed=2)
    head_before = {k: v.clone() for k, v in dst.depth_head.state_dict().items()}
    report = load_encoder_weights(dst, src.pretrained.state_dict())
    assert report.source == "timm" and not report.ignored
    assert _encoder_equal(src, dst)
    assert all(torch.equal(v, dst.depth_head.state_dict()[k]) for k, v in head_before.items())


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_safetensors_weights_load_as_torch_files_do(tmp_path, layout):
    """timm and the model hubs ship .safetensors; whatever the first bytes of its header length
    (a check for torch's own formats used to refuse most such files)."""
    from safetensors.torch import save_file

    from curriculum.checkpoint import CheckpointError, read_checkpoint

    src, dst = _tiny(seed=1), _tiny(seed=2)
    sd = src.pretrained.state_dict() if layout == "timm" else official_state_dict(src)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    report = load_encoder_weights(dst, tmp_path / "model.safetensors")
    assert report.source == ("timm" if layout == "timm" else "depth_anything_v2")
    assert _encoder_equal(src, dst)
    if layout == "official":
        loaded = load_official(tmp_path / "model.safetensors", "tiny", 80.0)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in src.state_dict().items())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "model.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: corrupt or truncated safetensors file"):
        read_checkpoint(cut)


def test_load_encoder_weights_dinov2_layout(tmp_path):
    src, dst = _tiny(seed=1), _tiny(seed=2)
    sd = src.pretrained.state_dict()
    # Original DINOv2 names: a mask token and (in block-chunked files) blocks.<chunk>.<i>.*
    dino = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}." + k[len("blocks.") :]
        dino[k] = v
    dino["mask_token"] = torch.zeros(1, 64)
    torch.save(dino, tmp_path / "dinov2.pth")
    report = load_encoder_weights(dst, tmp_path / "dinov2.pth")
    assert report.source == "dinov2"
    assert "mask_token" in report.ignored and "mask_token" in str(report)
    assert _encoder_equal(src, dst)


def test_load_encoder_weights_relative_dav2_ignores_head():
    src, dst = _tiny(seed=1), _tiny(seed=2)
    report = load_encoder_weights(dst, official_state_dict(src))
    assert report.source == "depth_anything_v2"
    assert "pretrained.mask_token" in report.ignored
    assert any(k.startswith("depth_head.") for k in report.ignored)
    assert any("head was not loaded" in n for n in report.notes)
    assert _encoder_equal(src, dst)
    assert not torch.equal(
        src.depth_head.scratch.output_conv1.weight, dst.depth_head.scratch.output_conv1.weight
    )


def test_load_encoder_weights_errors_name_keys():
    src, dst = _tiny(seed=1), _tiny(seed=2)
    sd = src.pretrained.state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys: .*blocks\.0\.attn\.foo"):
        load_encoder_weights(dst, dict(sd, **{"blocks.0.attn.foo": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"missing keys: norm\.weight"):
        load_encoder_weights(dst, {k: v for k, v in sd.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match=r"unexpected keys: something\.else"):
        load_encoder_weights(dst, dict(official_state_dict(src), **{"something.else": torch.zeros(1)}))
    with torch.device("meta"):
        vits = DepthModel("vits", "sigmoid", 1e-3, 80.0)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_encoder_weights(dst, vits.pretrained.state_dict())


# -------------------------------------------- agreement with a from-scratch DINOv2 forward pass


def _reference_tokens(vit, x, layers):
    """DINOv2 as in the official code: explicit attention, (n + 0.1) / 37 bicubic pos-embed."""
    b, _, h, w = x.shape
    ph, pw = h // 14, w // 14
    dim = vit.embed_dim
    t = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=14)
    t = torch.cat([vit.cls_token.expand(b, -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    pe = vit.pos_embed
    n = pe.shape[1] - 1
    if not (ph * pw == n and h == w):
        side = math.sqrt(n)
        grid = pe[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((ph + 0.1) / side, (pw + 0.1) / side), mode="bicubic")
        pe = torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    t = t + pe
    out = []
    for i, blk in enumerate(vit.blocks):
        heads = blk.attn.num_heads
        y = F.layer_norm(t, (dim,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = F.linear(y, blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.reshape(b, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(b, -1, dim), blk.attn.proj.weight, blk.attn.proj.bias)
        t = t + blk.ls1.gamma * y
        y = F.layer_norm(t, (dim,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        y = F.linear(F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        t = t + blk.ls2.gamma * y
        if i in layers:
            out.append(F.layer_norm(t, (dim,), vit.norm.weight, vit.norm.bias, 1e-6)[:, 1:])
    return out


def test_token_stream_stays_fp32_under_bf16_autocast():
    """As in timm and the official forward: every block adds its residual in fp32 (the fp32 class
    token and position embedding promote the bf16 patch embedding); only matrix products are bf16."""
    model = _tiny().eval()
    seen = []
    for blk in model.pretrained.blocks:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model._intermediate_tokens(torch.randn(1, 3, 28, 42), 2, 3)
    assert seen and set(seen) == {torch.float32} and all(t.dtype == torch.float32 for t in tokens)


@pytest.mark.parametrize("size", [(518, 518), (126, 378), (252, 182)])
def test_encoder_tokens_match_reference(size):
    model = _tiny().eval()
    _perturb(model)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ours = model._intermediate_tokens(x, size[0] // 14, size[1] // 14)
        ref = _reference_tokens(model.pretrained, x, model.layers)
        timm_tokens = model.encoder.forward_intermediates(
            x, indices=list(model.layers), norm=True, output_fmt="NLC", intermediates_only=True
        )
    for a, r, t in zip(ours, ref, timm_tokens):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4)
        if size == (518, 518):  # no position-embedding resize: timm's own forward agrees
            assert torch.allclose(a, t, atol=1e-5)


def test_channels_last_head_gets_its_token_maps_without_a_copy():
    """The four token maps reach the head's 1x1 projections already dense and channels-last (a
    view of the encoder's output), so neither those convolutions nor their backward copy them."""
    model = _tiny()
    model.depth_head.to(memory_format=torch.channels_last)
    seen = []
    hooks = [proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for proj in model.depth_head.projects]
    model(torch.randn(2, 3, 56, 84))
    for h in hooks:
        h.remove()
    assert len(seen) == 4
    for x in seen:
        assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (2, x.shape[1], 4, 6)


# -------------------------------------------------------------------------------- construction


def test_build_model_and_metadata():
    cfg = {"encoder": "tiny", "head": "log", "min_depth": 0.01, "max_depth": 1000.0, "uncertainty": True}
    model = build_model(cfg)
    assert model.metadata() == cfg
    assert build_model(model.metadata()).metadata() == cfg
    with pytest.raises(ValueError, match="max_dpeth"):
        build_model(dict(cfg, max_dpeth=80))
    with pytest.raises(ValueError, match="head"):
        build_model(dict(cfg, head="linear"))
    with pytest.raises(ValueError, match="encoder"):
        build_model(dict(cfg, encoder="vitg"))
    with pytest.raises(ValueError, match="max_depth"):
        build_model({"encoder": "tiny", "head": "log"})
    with pytest.raises(ValueError, match="max_depth"):
        build_model(dict(cfg, max_depth=0.001))


def test_parameter_groups_partition():
    model = _tiny(uncertainty=True)
    enc = {id(p) for p in model.encoder_parameters()}
    head = {id(p) for p in model.head_parameters()}
    unused = {id(p) for p in model.depth_head.scratch.refinenet4.resConfUnit1.parameters()}
    assert enc.isdisjoint(head) and unused.isdisjoint(head)
    assert enc | head | unused == {id(p) for p in model.parameters()}
    # The only module the forward never uses is frozen, so DDP never waits on its gradients.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == enc | head
    assert {id(p) for p in model.uncertainty_head.parameters()} <= head
    assert all(k.startswith(("pretrained.", "depth_head.", "uncertainty_head.")) for k in model.state_dict())


def test_cudnn_gets_every_convolution_in_the_layout_it_computes_in(monkeypatch):
    """cuDNN computes a convolution channels-last when its input or weight is, and first copies any
    input or output gradient that is not (the profile of a vitl step before the head's layouts
    were fixed: 28 such copies, 3.8 ms). Traced with fake tensors, whose convolutions follow the
    rule cuDNN follows, the GPU configuration of the training step (channels-last head,
    matrix-product resizes, channel-sum projections, the loss) hands every convolution its tensors
    in that layout. The one exception is the patch embedding's output gradient, a slice of the
    token gradient (the class token's row cut off) that timm's ViT makes: 45 MB of copying for a
    vitl batch of 16, not worth forking the encoder for."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from curriculum.losses import compute_loss

    cl = torch.channels_last

    def is_cl(t):
        return t.dim() == 4 and t.is_contiguous(memory_format=cl) and not t.is_contiguous()

    def cudnn_format(x, w, backend=None):  # at::native::cudnn_conv_suggest_memory_format
        return cl if is_cl(x) or is_cl(w) else torch.contiguous_format

    monkeypatch.setattr(torch._C, "_conv_determine_backend_memory_format", cudnn_format)

    class Layouts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.convs, self.copies = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("convolution", "convolution_backward"):
                self.convs += 1
                x, w = (args[0], args[1]) if name == "convolution" else (args[1], args[2])
                fmt = cudnn_format(x, w)
                checked = [("input", x)] + ([("grad_output", args[0])] if name == "convolution_backward" else [])
                patch_embed = tuple(w.shape[1:]) == (3, PATCH, PATCH)
                self.copies += [(name, what, tuple(t.shape)) for what, t in checked
                                if not t.is_contiguous(memory_format=fmt) and not (patch_embed and what == "grad_output")]
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = DepthModel("tiny", "log", 0.1, 1000.0)
    model.depth_head.to(memory_format=cl)
    model.matmul_resize = model.sum_projection = True  # what the model picks when compiled for CUDA
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model._apply(fake.from_tensor)
    with fake:
        image = torch.randn(2, 3, 4 * PATCH, 6 * PATCH).contiguous(memory_format=cl)
        target, weight = torch.full((2, 4 * PATCH, 6 * PATCH), 20.0), torch.ones(2, 4 * PATCH, 6 * PATCH)
        layouts = Layouts()
        with layouts:
            compute_loss(model(image), target, weight)["loss"].backward()
    assert layouts.convs > 40 and layouts.copies == []


def test_the_uncertainty_head_reads_the_depth_features_without_training_them():
    """Its NLL trains the head alone: sharing the gradient pulled the encoder and depth head
    towards features that make the scale small, and the depth fell apart (abs_rel 56 vs 0.35)."""
    from curriculum.losses import laplace_nll

    torch.manual_seed(0)
    model = DepthModel("tiny", "log", 0.1, 100.0, uncertainty=True).train()
    out = model(torch.randn(2, 3, 42, 56))
    target = torch.full_like(out.depth, 20.0)
    laplace_nll(out.depth.detach(), target, torch.ones_like(target), out.uncertainty).backward()
    for name, p in model.named_parameters():
        grad = 0.0 if p.grad is None else float(p.grad.abs().sum())
        if name.startswith("uncertainty_head."):
            assert grad > 0, name
        else:
            assert grad == 0.0, name
