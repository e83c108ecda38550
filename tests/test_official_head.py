"""The DPT head against an independent, functional Depth-Anything-V2 head.

The other "official" tests round-trip through ``official_state_dict``/``load_official``, so a head
that differs from the official one (a swapped block, a resize in the wrong place, the wrong
``align_corners``) would still pass them. Here the reference below re-derives the official
forward (``DPTHead`` in depth_anything_v2/dpt.py, ``FeatureFusionBlock``/``ResidualConvUnit`` in
depth_anything_v2/util/blocks.py; no batch norm, no class-token readout, as every released
checkpoint) with ``torch.nn.functional`` only, reading weights by their official ``depth_head.*``
names. The project model gets the same random official-keyed state dict through
``load_official`` and must give the same depth.

Only the ``sigmoid`` head has an official counterpart (the metric models: ``Sigmoid`` at the end
of ``output_conv2``, times ``max_depth``). The ``log`` head is the project's own, and the official
relative models (head ending in ReLU) are not loadable as a depth head here by design, so neither
is compared.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from curriculum.model import DepthModel, load_official, official_state_dict
from test_model import _reference_tokens  # independent DINOv2 forward (tests/test_model.py)

ENCODER = "vits"
MAX_DEPTH = 20.0  # the Hypersim metric models' value
# 5x7 patches: odd grids, so refinenet4's resize to layer3's size (3x4 -> 5x7) and the final
# resize to 70x98 are not plain doublings, and an off-by-one in any size shows.
IMAGE = (2, 3, 70, 98)


# ------------------------------------------------------------------------------ reference head


def _conv(sd, name, x, stride=1, padding=0):
    return F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), stride=stride, padding=padding)


def _residual_unit(sd, name, x):
    # ReLU -> conv3x3 -> ReLU -> conv3x3, plus the untouched input (the official activation is
    # nn.ReLU(False), so x itself is not modified).
    out = _conv(sd, f"{name}.conv1", F.relu(x), padding=1)
    out = _conv(sd, f"{name}.conv2", F.relu(out), padding=1)
    return out + x


def _fusion(sd, name, x, skip=None, size=None, align_corners=True):
    if skip is not None:
        x = x + _residual_unit(sd, f"{name}.resConfUnit1", skip)
    x = _residual_unit(sd, f"{name}.resConfUnit2", x)
    # The official block resizes BEFORE its 1x1 out_conv: to ``size`` when given, else by
    # scale_factor=2 (refinenet1 only).
    resize = {"size": tuple(size)} if size is not None else {"scale_factor": 2}
    x = F.interpolate(x, **resize, mode="bilinear", align_corners=align_corners)
    return _conv(sd, f"{name}.out_conv", x)


def reference_logits(sd, tokens, patch_h, patch_w, align_corners=True):
    """Official DPTHead forward up to (not including) its final activation: (B, 1, 14h, 14w)."""
    h = "depth_head"
    maps = []
    for i, t in enumerate(tokens):
        x = t.permute(0, 2, 1).reshape(t.shape[0], t.shape[-1], patch_h, patch_w)
        x = _conv(sd, f"{h}.projects.{i}", x)
        if i == 0:  # ConvTranspose2d k4 s4: 4x up
            x = F.conv_transpose2d(x, sd[f"{h}.resize_layers.0.weight"], sd[f"{h}.resize_layers.0.bias"], stride=4)
        elif i == 1:  # ConvTranspose2d k2 s2: 2x up
            x = F.conv_transpose2d(x, sd[f"{h}.resize_layers.1.weight"], sd[f"{h}.resize_layers.1.bias"], stride=2)
        elif i == 3:  # Conv2d k3 s2 p1: 2x down (resize_layers.2 is Identity, no weights)
            x = _conv(sd, f"{h}.resize_layers.3", x, stride=2, padding=1)
        maps.append(x)
    s = f"{h}.scratch"
    l1, l2, l3, l4 = (_conv(sd, f"{s}.layer{i}_rn", m, padding=1) for i, m in enumerate(maps, start=1))
    ac = align_corners
    # refinenet4 gets no skip input: its resConfUnit1 is never run in the official forward.
    p4 = _fusion(sd, f"{s}.refinenet4", l4, size=l3.shape[2:], align_corners=ac)
    p3 = _fusion(sd, f"{s}.refinenet3", p4, l3, size=l2.shape[2:], align_corners=ac)
    p2 = _fusion(sd, f"{s}.refinenet2", p3, l2, size=l1.shape[2:], align_corners=ac)
    p1 = _fusion(sd, f"{s}.refinenet1", p2, l1, align_corners=ac)
    out = _conv(sd, f"{s}.output_conv1", p1, padding=1)
    out = F.interpolate(out, (int(patch_h * 14), int(patch_w * 14)), mode="bilinear", align_corners=ac)
    out = F.relu(_conv(sd, f"{s}.output_conv2.0", out, padding=1))  # output_conv2[1] is ReLU
    return _conv(sd, f"{s}.output_conv2.2", out)


def reference_metric_depth(sd, tokens, patch_h, patch_w, max_depth, align_corners=True):
    """The official metric model: output_conv2 ends in Sigmoid, then ``* max_depth``, squeeze(1)."""
    logits = reference_logits(sd, tokens, patch_h, patch_w, align_corners)
    return (torch.sigmoid(logits) * max_depth).squeeze(1)


# ------------------------------------------------------------------------------------ fixtures


class _Recording(dict):
    """A state dict that records which keys were read, to prove the reference uses every head
    weight the project loads (and nothing else)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        if k in self:
            self.read.add(k)
        return super().get(k, default)


def _random_official_state_dict(seed=0):
    """Every official key (names and shapes from ``official_state_dict``) with fresh random values,
    scaled so activations stay O(1) through 12 blocks and the head: weights ~ N(0, 1/fan_in),
    norm scales near 1, small biases and layer scales. Nothing is left at its init value."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in official_state_dict(DepthModel(ENCODER, "sigmoid", 1e-3, MAX_DEPTH)).items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        r = torch.randn(shape, generator=g)
        if k.endswith(".gamma"):  # DINOv2 layer scale
            v = 0.1 + 0.05 * r
        elif k in ("pretrained.cls_token", "pretrained.pos_embed", "pretrained.mask_token"):
            v = 0.5 * r
        elif len(shape) == 1 and k.endswith(".weight"):  # layer norms
            v = 1.0 + 0.1 * r
        elif len(shape) == 1:  # biases
            v = 0.1 * r
        else:
            # ConvTranspose2d weights are (in, out, k, k); with stride == kernel each output sees
            # only ``in`` inputs.
            fan_in = shape[0] if ".resize_layers.0." in k or ".resize_layers.1." in k else math.prod(shape[1:])
            v = r / math.sqrt(fan_in)
        sd[k] = v
    # A logit spread of a few units keeps the sigmoid away from saturation, where it would hide
    # differences.
    sd["depth_head.scratch.output_conv2.2.weight"] *= 1.5
    return sd


@pytest.fixture(scope="module")
def case():
    sd = _random_official_state_dict()
    model = load_official(dict(sd), ENCODER, MAX_DEPTH)  # the project's own loader
    assert model.head == "sigmoid" and not model.training
    x = torch.randn(*IMAGE, generator=torch.Generator().manual_seed(1))
    ph, pw = IMAGE[2] // 14, IMAGE[3] // 14
    with torch.no_grad():
        tokens = _reference_tokens(model.pretrained, x, model.layers)
        rec = _Recording(sd)
        ref = reference_metric_depth(rec, tokens, ph, pw, MAX_DEPTH)
    return dict(sd=sd, model=model, x=x, ph=ph, pw=pw, tokens=tokens, ref=ref, read=rec.read)


def _project_depth(model, x, matmul_resize=False, sum_projection=False):
    model.matmul_resize, model.sum_projection = matmul_resize, sum_projection
    try:
        with torch.no_grad():
            return model(x).depth
    finally:
        model.matmul_resize = model.sum_projection = None


def _load_head(model, sd):
    """The head part of an official state dict, as ``load_official`` loads it (cheaper than
    building a second vits)."""
    model.depth_head.load_state_dict({k[len("depth_head."):]: v for k, v in sd.items() if k.startswith("depth_head.")})


# ------------------------------------------------------------------------------------------ tests


def test_reference_reads_every_head_weight_but_refinenet4_skip_unit(case):
    head_keys = {k for k in case["sd"] if k.startswith("depth_head.")}
    unused = {k for k in head_keys if k.startswith("depth_head.scratch.refinenet4.resConfUnit1.")}
    assert len(unused) == 4 and len(head_keys) == 64
    assert case["read"] == head_keys - unused


def test_reference_output_is_not_degenerate(case):
    ref = case["ref"]
    assert ref.shape == (IMAGE[0], IMAGE[2], IMAGE[3]) and torch.isfinite(ref).all()
    frac = ref / MAX_DEPTH
    # Mostly unsaturated and varied, so the comparison below constrains every pixel.
    assert ((frac > 0.02) & (frac < 0.98)).float().mean() > 0.9
    assert ref.std() > 0.05 * MAX_DEPTH


def test_metric_head_matches_official_reference(case):
    model = case["model"]
    seen = []
    hook = model.depth_head.scratch.output_conv2[2].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        ours = _project_depth(model, case["x"])
    finally:
        hook.remove()
    torch.testing.assert_close(ours, case["ref"], rtol=1e-4, atol=1e-5)
    # Before the sigmoid too, where no saturation can hide a difference.
    with torch.no_grad():
        ref_logits = reference_logits(case["sd"], case["tokens"], case["ph"], case["pw"])
    assert len(seen) == 1 and ref_logits.std() > 0.5
    torch.testing.assert_close(seen[0], ref_logits, rtol=1e-4, atol=1e-5)


def test_metric_head_fast_paths_match_official_reference(case):
    # The matrix-product resizes and channel-sum projection the model picks when compiled for
    # CUDA, forced here on CPU: they must compute the official head too.
    ours = _project_depth(case["model"], case["x"], matmul_resize=True, sum_projection=True)
    torch.testing.assert_close(ours, case["ref"], rtol=1e-4, atol=1e-5)


def _swapped(sd, a, b):
    out = dict(sd)
    for k in sd:
        if k.startswith(a):
            out[k], out[b + k[len(a):]] = sd[b + k[len(a):]], sd[k]
    return out


@pytest.mark.parametrize(
    "a, b",
    [
        ("depth_head.scratch.refinenet2.", "depth_head.scratch.refinenet3."),
        ("depth_head.scratch.refinenet2.resConfUnit1.", "depth_head.scratch.refinenet2.resConfUnit2."),
    ],
    ids=["refinenet2<->refinenet3", "refinenet2.resConfUnit1<->resConfUnit2"],
)
def test_comparison_detects_a_miswired_head(case, a, b):
    """The comparison can fail: the same weights loaded into the wrong blocks change the depth far
    beyond the tolerance above."""
    model = case["model"]
    try:
        _load_head(model, _swapped(case["sd"], a, b))
        ours = _project_depth(model, case["x"])
    finally:
        _load_head(model, case["sd"])
    assert (ours - case["ref"]).abs().max() > 1e-2 * MAX_DEPTH


def test_comparison_detects_align_corners_false(case):
    """The official head resizes with align_corners=True everywhere; False would be a visible
    difference, so a project head using it could not pass."""
    with torch.no_grad():
        other = reference_metric_depth(case["sd"], case["tokens"], case["ph"], case["pw"], MAX_DEPTH, align_corners=False)
    assert (other - case["ref"]).abs().max() > 1e-2 * MAX_DEPTH


def test_refinenet4_skip_unit_is_unused(case):
    """As in the official forward, refinenet4.resConfUnit1 (present in every checkpoint) never
    affects the output."""
    model = case["model"]
    sd = dict(case["sd"])
    for k in sd:
        if k.startswith("depth_head.scratch.refinenet4.resConfUnit1."):
            sd[k] = sd[k] * -3.0 + 1.0
    try:
        _load_head(model, sd)
        ours = _project_depth(model, case["x"])
    finally:
        _load_head(model, case["sd"])
    torch.testing.assert_close(ours, case["ref"], rtol=1e-4, atol=1e-5)
