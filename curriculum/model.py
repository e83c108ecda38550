"""DINOv2 ViT encoder + DPT head, laid out like Depth-Anything-V2.

The encoder is a timm ``VisionTransformer`` (``vit_{small,base,large}_patch14_dinov2``) registered
under ``pretrained`` and the head under ``depth_head`` with the official sub-module names, so an
official Depth-Anything-V2 state dict maps onto this model key for key. The only official key this
model lacks is ``pretrained.mask_token`` (DINOv2's masked-image-modelling token, never used at
inference); the loaders accept and report it.

Numerics follow the official forward: the selected blocks' outputs go through the final norm, the
class token is dropped, tokens are reshaped to (B, C, h, w), then projects -> resize_layers ->
scratch.layerN_rn -> refinenet4..1 (bilinear, align_corners=True) -> output_conv1 -> bilinear
resize to (14h, 14w) -> output_conv2 -> activation.

Position embeddings: the official DINOv2 code resizes the 37x37 grid with bicubic interpolation
driven by a scale factor (grid + 0.1) / 37 and no antialiasing; timm's own forward resizes to the
target size with antialiasing, which gives slightly different values at sizes other than 518x518.
``DepthModel`` runs its own token preparation with the official rule, so official weights reproduce
official output at every size. Calling ``model.encoder(x)`` directly uses timm's rule; at 518x518
(37x37 patches) both are the identity and agree exactly.

The final 1x1 convolution and the output activation always run in fp32 (autocast disabled): bf16
logits would put about 0.4 % noise on the depth, several percent through the log head's exp.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from curriculum.layers import one_channel_projection, resize_bilinear

logger = logging.getLogger(__name__)

PATCH = 14
HEADS = ("sigmoid", "log")


@dataclass(frozen=True)
class EncoderSpec:
    """Backbone and head sizes of one encoder configuration."""

    timm_name: str | None  # timm model name, or None for a ViT built from ``vit_kwargs``
    embed_dim: int
    layers: tuple[int, ...]  # blocks whose outputs feed the DPT head
    features: int  # DPT fusion width
    out_channels: tuple[int, int, int, int]  # widths of the four reassembled feature maps
    vit_kwargs: Mapping[str, Any] = field(default_factory=dict)


ENCODER_SPECS: dict[str, EncoderSpec] = {
    # Small enough to train on two CPU cores in tests and the demo; not an official size.
    "tiny": EncoderSpec(
        timm_name=None,
        embed_dim=64,
        layers=(0, 1, 2, 3),
        # 16 rather than 32: the full-resolution output convolutions dominate CPU time.
        features=16,
        out_channels=(32, 64, 64, 64),
        vit_kwargs=dict(depth=4, num_heads=2, mlp_ratio=4.0, init_values=1.0),
    ),
    "vits": EncoderSpec("vit_small_patch14_dinov2", 384, (2, 5, 8, 11), 64, (48, 96, 192, 384)),
    "vitb": EncoderSpec("vit_base_patch14_dinov2", 768, (2, 5, 8, 11), 128, (96, 192, 384, 768)),
    "vitl": EncoderSpec("vit_large_patch14_dinov2", 1024, (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
}

# Official keys that have no counterpart here, with the reason they are not loaded.
OFFICIAL_IGNORED_KEYS: dict[str, str] = {
    "pretrained.mask_token": "DINOv2 masked-image-modelling token, unused for depth (no parameter here)",
}
DINOV2_IGNORED_KEYS: dict[str, str] = {
    "mask_token": "DINOv2 masked-image-modelling token, unused for depth (no parameter here)",
}


class DepthPrediction(NamedTuple):
    depth: torch.Tensor  # (B, H, W) metres, fp32
    uncertainty: torch.Tensor | None  # (B, H, W) Laplace scale b > 0 of log-depth, fp32


def _build_vit(spec: EncoderSpec) -> VisionTransformer:
    common = dict(num_classes=0, dynamic_img_size=True, img_size=518)
    if spec.timm_name is not None:
        return timm.create_model(spec.timm_name, pretrained=False, **common)
    return VisionTransformer(patch_size=PATCH, embed_dim=spec.embed_dim, **common, **dict(spec.vit_kwargs))


# --------------------------------------------------------------------------------------- DPT head


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place: x is also the skip input.
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return out + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, bias=True)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None,
                matmul_resize: bool = False) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        # size None: the official scale_factor=2, which with align_corners is exactly (2h, 2w)
        size = (2 * x.shape[-2], 2 * x.shape[-1]) if size is None else tuple(size)
        x = resize_bilinear(x, size, matmul=matmul_resize)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Depth-Anything-V2's DPT head (no class-token readout, no batch norm).

    ``output_conv2`` holds conv3x3 -> ReLU -> conv1x1 (same parameter keys as the official
    module); the official trailing Sigmoid is applied by ``DepthModel`` in fp32.
    """

    def __init__(self, in_channels: int, features: int, out_channels: tuple[int, ...]):
        super().__init__()
        c = list(out_channels)
        self.projects = nn.ModuleList([nn.Conv2d(in_channels, oc, 1) for oc in c])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, oc in enumerate(c, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(oc, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(features))
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, 1),
        )
        # refinenet4 has no skip input, so its resConfUnit1 never runs; it exists only for the
        # official key layout. Frozen, so DDP does not wait for gradients it never gets.
        self.scratch.refinenet4.resConfUnit1.requires_grad_(False)

    def unused_parameters(self) -> list[nn.Parameter]:
        return list(self.scratch.refinenet4.resConfUnit1.parameters())

    def features(self, tokens: list[torch.Tensor], patch_h: int, patch_w: int,
                 matmul_resize: bool = False) -> torch.Tensor:
        """Patch tokens (B, N, C) of the four layers -> output_conv1 features at full resolution.

        ``matmul_resize``: bilinear upsampling as matrix products (``curriculum.layers``), same
        values to rounding, faster to train when compiled for a GPU.
        """
        maps = []
        for i, x in enumerate(tokens):
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], patch_h, patch_w)
            maps.append(self.resize_layers[i](self.projects[i](x)))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1))
        mm = matmul_resize
        p4 = s.refinenet4(l4, size=l3.shape[2:], matmul_resize=mm)
        p3 = s.refinenet3(p4, l3, size=l2.shape[2:], matmul_resize=mm)
        p2 = s.refinenet2(p3, l2, size=l1.shape[2:], matmul_resize=mm)
        p1 = s.refinenet1(p2, l1, matmul_resize=mm)
        out = s.output_conv1(p1)
        return resize_bilinear(out, (patch_h * PATCH, patch_w * PATCH), matmul=mm)


class UncertaintyHead(nn.Module):
    """Laplace scale of the log-depth residual, from the same features as ``output_conv2``."""

    def __init__(self, in_channels: int, hidden: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 1, 1)


# ------------------------------------------------------------------------------------------ model


def _official_pos_embed(pos_embed: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """DINOv2 (Depth-Anything-V2) position-embedding resize: bicubic by scale factor, +0.1 offset."""
    n = pos_embed.shape[1] - 1
    side = math.sqrt(n)
    grid = int(side)
    if patch_h * patch_w == n and patch_h == patch_w:
        return pos_embed
    pe = pos_embed.float()
    dim = pe.shape[-1]
    patch = pe[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    scale = (float(patch_h + 0.1) / side, float(patch_w + 0.1) / side)
    patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (patch_h, patch_w):
        raise RuntimeError(f"position embedding resized to {tuple(patch.shape[-2:])}, expected {(patch_h, patch_w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pe[:, :1], patch], dim=1).to(pos_embed.dtype)


class DepthModel(nn.Module):
    """DINOv2 encoder + DPT head mapping a normalised image to metric depth.

    head ``sigmoid``: depth = sigmoid(x) * max_depth (Depth-Anything-V2's metric head).
    head ``log``: depth = exp(log(min_depth) + sigmoid(x) * (log(max_depth) - log(min_depth))),
    which covers the unclipped range (e.g. sky at 655 m with max_depth 1000).
    """

    def __init__(
        self,
        encoder: str,
        head: str,
        min_depth: float,
        max_depth: float,
        uncertainty: bool = False,
    ):
        super().__init__()
        if encoder not in ENCODER_SPECS:
            raise ValueError(f"encoder: unknown {encoder!r}, expected one of {sorted(ENCODER_SPECS)}")
        if head not in HEADS:
            raise ValueError(f"head: unknown {head!r}, expected one of {list(HEADS)}")
        min_depth, max_depth = float(min_depth), float(max_depth)
        if not (math.isfinite(min_depth) and min_depth > 0):
            raise ValueError(f"min_depth must be positive and finite, got {min_depth}")
        if not (math.isfinite(max_depth) and max_depth > min_depth):
            raise ValueError(f"max_depth must be finite and above min_depth ({min_depth}), got {max_depth}")
        self.encoder_name = encoder
        self.head = head
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.spec = ENCODER_SPECS[encoder]
        self.pretrained = _build_vit(self.spec)
        self.depth_head = DPTHead(self.pretrained.embed_dim, self.spec.features, self.spec.out_channels)
        self.uncertainty_head = UncertaintyHead(self.spec.features // 2) if uncertainty else None
        self._grad_checkpointing = False
        # None: matrix-product upsampling when compiled for CUDA, F.interpolate otherwise (see
        # curriculum.layers); True/False force one.
        self.matmul_resize: bool | None = None
        # None: the last 1x1 convolutions as channel sums when compiled, convolutions otherwise
        # (see curriculum.layers.one_channel_projection); True/False force one.
        self.sum_projection: bool | None = None

    # -- introspection ------------------------------------------------------------------------

    @property
    def encoder(self) -> VisionTransformer:
        return self.pretrained

    @property
    def layers(self) -> tuple[int, ...]:
        return self.spec.layers

    @property
    def has_uncertainty(self) -> bool:
        return self.uncertainty_head is not None

    def metadata(self) -> dict:
        return {
            "encoder": self.encoder_name,
            "head": self.head,
            "min_depth": self.min_depth,
            "max_depth": self.max_depth,
            "uncertainty": self.has_uncertainty,
        }

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.pretrained.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the encoder, except the head's never-used (frozen) ones."""
        skip = {id(p) for p in self.pretrained.parameters()}
        skip |= {id(p) for p in self.depth_head.unused_parameters()}
        return (p for p in self.parameters() if id(p) not in skip)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self._grad_checkpointing = bool(enable)
        self.pretrained.set_grad_checkpointing(bool(enable))

    # -- forward ------------------------------------------------------------------------------

    def _intermediate_tokens(self, x: torch.Tensor, patch_h: int, patch_w: int) -> list[torch.Tensor]:
        vit = self.pretrained
        t = vit.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        b = t.shape[0]
        t = t.reshape(b, patch_h * patch_w, t.shape[-1])
        # The token stream stays fp32 under autocast, as in timm and the official forward (the
        # fp32 class token and position embedding promote it): each block adds its residual in
        # fp32; only the blocks' matrix products run in bf16.
        t = torch.cat([vit.cls_token.expand(b, -1, -1), t], dim=1)
        t = t + _official_pos_embed(vit.pos_embed, patch_h, patch_w)
        t = vit.norm_pre(vit.patch_drop(vit.pos_drop(t)))
        wanted = set(self.spec.layers)
        use_ckpt = self._grad_checkpointing and self.training and torch.is_grad_enabled()
        out = []
        for i, blk in enumerate(vit.blocks[: max(wanted) + 1]):
            t = checkpoint(blk, t, use_reentrant=False) if use_ckpt else blk(t)
            if i in wanted:
                # Per-token norm of the patch tokens alone: the same values as norm-then-slice, in
                # a dense tensor whose (B, C, h, w) view is channels-last as it stands, so the
                # head's first convolutions (and their backward) need no copy of their input.
                out.append(vit.norm(t[:, vit.num_prefix_tokens :]))
        return out

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(logits)
        if self.head == "sigmoid":
            return s * self.max_depth
        lo, hi = math.log(self.min_depth), math.log(self.max_depth)
        return torch.exp(lo + s * (hi - lo))

    def forward(self, x: torch.Tensor) -> DepthPrediction:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % PATCH or w % PATCH:
            raise ValueError(f"image size {h}x{w} is not a multiple of {PATCH}")
        ph, pw = h // PATCH, w // PATCH
        matmul_resize = self.matmul_resize
        if matmul_resize is None:
            # Measured on an H200 (benchmarks/RESULTS.md): compiled, the matrix products make a vits
            # step a quarter shorter; eager, their layout copies cost more than the atomics they save.
            matmul_resize = x.is_cuda and torch.compiler.is_compiling()
        feats = self.depth_head.features(self._intermediate_tokens(x, ph, pw), ph, pw, matmul_resize)
        oc2 = self.depth_head.scratch.output_conv2
        hidden = oc2[1](oc2[0](feats))
        unc_hidden = None
        if self.uncertainty_head is not None:
            # detached: the uncertainty reads the depth features without training them (its NLL
            # pulled the shared features towards whatever makes b small, and depth fell apart)
            unc_hidden = F.relu(self.uncertainty_head.conv1(feats.detach()))
        sum_projection = self.sum_projection
        if sum_projection is None:  # eager keeps the convolutions, so eager runs stay bit-identical
            sum_projection = torch.compiler.is_compiling()
        project = one_channel_projection if sum_projection else (lambda t, conv: conv(t))
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = project(hidden.float(), oc2[2])
            depth = self._activate(logits.float()).squeeze(1)
            unc = None
            if unc_hidden is not None:
                raw = project(unc_hidden.float(), self.uncertainty_head.conv2)
                unc = (F.softplus(raw) + 1e-4).squeeze(1)
        return DepthPrediction(depth, unc)


# ----------------------------------------------------------------------------------- construction

_MODEL_KEYS = ("encoder", "head", "min_depth", "max_depth", "uncertainty")
_REQUIRED_KEYS = ("encoder", "head", "max_depth")


def build_model(cfg: Mapping) -> DepthModel:
    """Build from a recipe mapping with keys encoder, head, min_depth (default 1e-3), max_depth,
    uncertainty (default False)."""
    unknown = [k for k in cfg.keys() if k not in _MODEL_KEYS]
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; valid keys: {list(_MODEL_KEYS)}")
    missing = [k for k in _REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"missing model key(s) {missing}")
    return DepthModel(
        encoder=str(cfg["encoder"]),
        head=str(cfg["head"]),
        min_depth=float(cfg.get("min_depth", 1e-3)),
        max_depth=float(cfg["max_depth"]),
        uncertainty=bool(cfg.get("uncertainty", False)),
    )


# -------------------------------------------------------------------------------- weight loading


@dataclass
class LoadReport:
    """What a loader did with each key of the source state dict."""

    source: str  # detected layout: "depth_anything_v2", "dinov2" or "timm"
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> reason
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors ({self.source} layout)"]
        lines += [f"ignored {k}: {why}" for k, why in sorted(self.ignored.items())]
        lines += self.notes
        return "\n".join(lines)


def _read_state_dict(path_or_sd) -> dict[str, torch.Tensor]:
    if isinstance(path_or_sd, (str, Path)):
        from curriculum.checkpoint import read_checkpoint  # one-line errors for missing or corrupt files

        obj = read_checkpoint(path_or_sd)
    else:
        obj = path_or_sd
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    for wrapper in ("model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a state dict: non-tensor entries {_names(bad)}")
    return dict(obj)


def _strip_wrappers(sd: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Remove DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes (renamed, not dropped)."""
    out = {}
    renamed = 0
    for k, v in sd.items():
        nk = k[len("module.") :] if k.startswith("module.") else k
        nk = nk.replace("_orig_mod.", "")
        renamed += nk != k
        out[nk] = v
    if renamed:
        notes.append(f"stripped 'module.'/'_orig_mod.' wrapper prefixes from {renamed} keys")
    return out


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys)} in total)" if len(keys) > limit else f" ({len(keys)})"
    return shown + more


def _check_keys(what: str, got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shape = [
        f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shape:
        problems.append(f"shape mismatches: {_names(shape, 4)}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def official_state_dict(model: DepthModel) -> dict[str, torch.Tensor]:
    """This model's weights in the official Depth-Anything-V2 key layout.

    Adds ``pretrained.mask_token`` (zeros; the official module has it, this one does not) so the
    result loads strictly into the official model. The uncertainty head has no official
    counterpart and is not included.
    """
    sd = {f"pretrained.{k}": v.detach().clone() for k, v in model.pretrained.state_dict().items()}
    sd["pretrained.mask_token"] = torch.zeros(1, model.pretrained.embed_dim, dtype=model.pretrained.cls_token.dtype)
    sd.update({f"depth_head.{k}": v.detach().clone() for k, v in model.depth_head.state_dict().items()})
    return sd


def _infer_encoder(sd: Mapping[str, torch.Tensor], key: str) -> str:
    if key not in sd:
        raise ValueError(f"cannot infer the encoder size: no {key!r} in the state dict")
    dim = sd[key].shape[-1]
    for name, spec in ENCODER_SPECS.items():
        if spec.embed_dim == dim:
            return name
    raise ValueError(f"cannot infer the encoder size from embedding width {dim}")


def load_official(path, encoder: str | None, max_depth: float, min_depth: float = 1e-3) -> DepthModel:
    """Load an official Depth-Anything-V2 *metric* checkpoint into a ``sigmoid``-head model.

    ``path`` is a file (bare state dict, or one under "model"/"state_dict") or a state dict.
    ``encoder`` None infers vits/vitb/vitl from the embedding width. ``max_depth`` must be the one
    the checkpoint was trained with (20 for Hypersim, 80 for Virtual KITTI 2): it is not stored in
    the file. Every key must map: missing, unexpected or mis-shaped keys raise ValueError naming
    them, except those in ``OFFICIAL_IGNORED_KEYS``, which are logged and kept in the returned
    model's ``load_report``. A relative checkpoint has the same keys but a different output
    meaning (its head ends in ReLU, not Sigmoid); load it with ``load_encoder_weights``.
    Returns the model in eval mode.
    """
    notes: list[str] = []
    sd = _strip_wrappers(_read_state_dict(path), notes)
    if encoder is None:
        encoder = _infer_encoder(sd, "pretrained.pos_embed")
    model = DepthModel(encoder, "sigmoid", min_depth, max_depth)
    expected = official_state_dict(model)
    present_optional = {k: v for k, v in OFFICIAL_IGNORED_KEYS.items() if k in sd}
    required = {k: v for k, v in expected.items() if k not in OFFICIAL_IGNORED_KEYS}
    _check_keys(
        "official checkpoint",
        {k: v for k, v in sd.items() if k not in OFFICIAL_IGNORED_KEYS},
        required,
    )
    enc = {
        k[len("pretrained.") :]: v
        for k, v in sd.items()
        if k.startswith("pretrained.") and k not in OFFICIAL_IGNORED_KEYS
    }
    head = {k[len("depth_head.") :]: v for k, v in sd.items() if k.startswith("depth_head.")}
    model.pretrained.load_state_dict(enc, strict=True)
    model.depth_head.load_state_dict(head, strict=True)
    report = LoadReport("depth_anything_v2", loaded=sorted(required), ignored=present_optional, notes=notes)
    source = path if isinstance(path, (str, Path)) else "<state dict>"
    logger.info("load_official(%s, encoder=%s, max_depth=%s): %s", source, encoder, max_depth, report)
    model.load_report = report
    return model.eval()


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def load_encoder_weights(model: DepthModel, path_or_state_dict) -> LoadReport:
    """Initialise the encoder only, from a Depth-Anything-V2 checkpoint (relative or metric,
    ``pretrained.*``; its ``depth_head.*`` is reported and not loaded), an original DINOv2 state
    dict (facebookresearch key names, block-chunked or not) or a timm state dict.

    Keys that do not map raise ValueError naming them; keys in the documented ignore lists
    (``mask_token``, and ``depth_head.*`` of a Depth-Anything-V2 file) are returned in the report.
    """
    notes: list[str] = []
    sd = _strip_wrappers(_read_state_dict(path_or_state_dict), notes)
    ignored: dict[str, str] = {}
    if any(k.startswith("pretrained.") for k in sd):
        source = "depth_anything_v2"
        enc: dict[str, torch.Tensor] = {}
        other = []
        for k, v in sd.items():
            if k.startswith("pretrained."):
                enc[k[len("pretrained.") :]] = v
            elif k.startswith("depth_head."):
                ignored[k] = "Depth-Anything-V2 head; load_encoder_weights initialises the encoder only"
            else:
                other.append(k)
        if other:
            raise ValueError(f"Depth-Anything-V2 checkpoint: unexpected keys: {_names(other)}")
        if any(k.startswith("depth_head.") for k in sd):
            notes.append("the checkpoint's depth head was not loaded (a relative head has no metric meaning)")
        sd = enc
        for k in DINOV2_IGNORED_KEYS:
            if k in sd:
                ignored[f"pretrained.{k}"] = DINOV2_IGNORED_KEYS[k]
                del sd[k]
    else:
        source = "dinov2" if "mask_token" in sd or any(_CHUNKED_BLOCK.match(k) for k in sd) else "timm"
        for k in DINOV2_IGNORED_KEYS:
            if k in sd:
                ignored[k] = DINOV2_IGNORED_KEYS[k]
                del sd[k]
    unchunked = {}
    for k, v in sd.items():
        m = _CHUNKED_BLOCK.match(k)
        unchunked[f"blocks.{m.group(1)}." + k[m.end() :] if m else k] = v
    if len(unchunked) != len(sd):
        raise ValueError("encoder state dict: duplicate keys after removing block chunks")
    if any(_CHUNKED_BLOCK.match(k) for k in sd):
        notes.append("renamed block-chunked DINOv2 keys blocks.<chunk>.<i>.* to blocks.<i>.*")
    _check_keys(f"{source} encoder weights for {model.encoder_name}", unchunked, model.pretrained.state_dict())
    model.pretrained.load_state_dict(unchunked, strict=True)
    report = LoadReport(source, loaded=sorted(unchunked), ignored=ignored, notes=notes)
    logger.info("load_encoder_weights: %s", report)
    return report
