"""`curriculum predict`: depth for images, a colour PNG with a colour bar, metres as .npy, a PLY.

The network sees the image resized (aspect ratio kept) so that its shorter side is the input size
and both sides are multiples of 14; the prediction is resized back to the image's own size, so
every output has the input's size and the intrinsics of the original image apply.

Two kinds of checkpoints load:
- this project's checkpoints carry encoder, head and depth range; `max_depth` and `encoder`, if
  given, must agree with them (a silent rescale would give wrong metres);
- official Depth-Anything-V2 metric checkpoints (a bare state dict) record no range: the caller
  gives `max_depth` (80 for Virtual KITTI 2 / outdoor, 20 for Hypersim / indoor) and optionally
  `encoder` (otherwise inferred from the embedding width).

Every input is opened before the model runs, so a bad file stops the run with one line naming it
and nothing is half-written.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from curriculum.checkpoint import (
    META_KEY, MODEL_FIELDS, CheckpointError, load_weights, metadata, read_checkpoint, taught_far_target,
)
from curriculum.data import normalize_images
from curriculum.layers import upsample_depth
from curriculum.model import PATCH
from data_prep.files import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
OFFICIAL_INPUT_SIZE = 518  # Depth-Anything-V2's default inference size (shorter side)
DEFAULT_FOV = 60.0  # horizontal field of view (degrees) when no intrinsics are given
DEFAULT_EDGE_THRESHOLD = 0.05


class PredictError(ValueError):
    """A predict problem (input, checkpoint, flags), reported in one line."""


@dataclass
class Predictor:
    """A model ready for inference plus what the outputs need to know about it."""

    model: torch.nn.Module
    source: str  # "checkpoint" (this project's) or "official"
    encoder: str
    min_depth: float
    max_depth: float
    input_size: int  # shorter side of the network input, a multiple of 14
    sky_depth: float  # predictions at or beyond this are taken as sky by --drop-sky
    has_uncertainty: bool
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ loading

def _state_dict_like(obj: dict) -> dict | None:
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    from curriculum.model import _strip_wrappers

    keys = _strip_wrappers(obj, [])  # what load_official reads: without DDP or compile prefixes
    if any(k.startswith("pretrained.") for k in keys) and any(k.startswith("depth_head.") for k in keys):
        return obj
    return None


def load_official_file(path, ckpt: dict, encoder: str | None, max_depth: float | None):
    """The model of a file without this project's metadata (``ckpt``, already read), which must be
    an official Depth-Anything-V2 metric state dict; ``max_depth`` is required (not in the file)."""
    from curriculum.model import load_official

    sd = _state_dict_like(ckpt)
    if sd is None:
        raise CheckpointError(f"{path}: neither a checkpoint of this project (no '{META_KEY}' metadata) nor an "
                              "official Depth-Anything-V2 state dict (pretrained.* and depth_head.* keys)")
    if max_depth is None:
        raise PredictError(f"{path} is an official Depth-Anything-V2 checkpoint, which records no depth range: "
                           "give --max-depth (80 for outdoor / Virtual KITTI 2, 20 for indoor / Hypersim)")
    try:
        return load_official(sd, encoder, float(max_depth))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {str(exc).splitlines()[0]}") from None


def _check_device(device: str) -> str:
    """The device as given, or a one-line PredictError where torch would fail later with a traceback."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PredictError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PredictError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        if dev.index is not None and dev.index >= count:
            raise PredictError(f"--device {device}: this machine has {count} CUDA device(s)")
    return device


def load_predictor(checkpoint: str | os.PathLike, encoder: str | None = None, max_depth: float | None = None,
                   input_size: int | None = None, sky_depth: float | None = None,
                   device: str | None = None) -> Predictor:
    """Load one of this project's checkpoints or an official Depth-Anything-V2 metric checkpoint."""
    from curriculum.model import build_model

    path = Path(checkpoint)
    device = _check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = read_checkpoint(path)
    notes: list[str] = []
    if META_KEY in ckpt:
        meta = ckpt[META_KEY]
        if not isinstance(meta, dict) or "model" not in meta:
            raise CheckpointError(f"{path}: malformed '{META_KEY}' metadata")
        mm = metadata(ckpt, path)["model"]
        if max_depth is not None and float(max_depth) != float(mm["max_depth"]):
            raise PredictError(f"--max-depth {max_depth:g} conflicts with the checkpoint's range {mm['max_depth']:g} m "
                               f"({path}); this project's checkpoints carry their range: drop the flag")
        if encoder is not None and encoder != mm["encoder"]:
            raise PredictError(f"--encoder {encoder} conflicts with the checkpoint's encoder {mm['encoder']} ({path}); "
                               "drop the flag")
        model = build_model({k: mm[k] for k in MODEL_FIELDS})
        load_weights(model, ckpt, path)
        recipe = meta.get("recipe", {}) or {}
        data = recipe.get("data", {}) or {}
        default_size = min(int(data.get("val_height", OFFICIAL_INPUT_SIZE)), int(data.get("val_width", OFFICIAL_INPUT_SIZE)))
        far = taught_far_target(meta)
        # A model taught (itself or through init_from) to put the sky at the far target F: past
        # F/2 it says "sky". One never taught the sky has no depth that means sky; only the top
        # of its range does (also the cap for a far target the head could not reach, which recipes
        # now refuse but older checkpoints may carry).
        top = 0.98 * float(mm["max_depth"])
        default_sky = min(far / 2.0, top) if far is not None else top
        source, enc, lo, hi, unc = "checkpoint", mm["encoder"], float(mm["min_depth"]), float(mm["max_depth"]), bool(mm["uncertainty"])
    else:
        model = load_official_file(path, ckpt, encoder, max_depth)
        if encoder is None:
            notes.append(f"encoder inferred from the weights: {model.encoder_name}")
        default_size = OFFICIAL_INPUT_SIZE
        # sigmoid x max_depth saturates: the sky ends up just under max_depth.
        default_sky = 0.98 * float(max_depth)
        source, enc, lo, hi, unc = "official", model.encoder_name, model.min_depth, model.max_depth, False
    size = int(default_size if input_size is None else input_size)
    if size <= 0 or size % PATCH:
        raise PredictError(f"--input-size must be a positive multiple of {PATCH}, got {size}")
    if sky_depth is not None and not lo < sky_depth <= hi:
        raise PredictError(f"--sky-depth {sky_depth:g} m lies outside the model's range ({lo:g}-{hi:g} m): "
                           "no prediction would reach it")
    return Predictor(model=model.to(device).eval(), source=source, encoder=enc, min_depth=lo, max_depth=hi,
                     input_size=size, sky_depth=float(sky_depth if sky_depth is not None else default_sky),
                     has_uncertainty=unc, device=device, notes=notes)


# ------------------------------------------------------------------------------------- inputs

def list_inputs(path: str | os.PathLike, recursive: bool = False, skip: tuple = ()) -> list[Path]:
    """One image file, or the images of a folder sorted by path: its own, or with ``recursive`` those
    of its subfolders too. Hidden files and folders (.git, .ipynb_checkpoints) are left out, and so
    are the folders in ``skip`` (the output and sky-mask folders, when they lie inside the input:
    depth PNGs and masks are not photos)."""
    path = Path(path)
    if path.is_dir():
        skip_dirs = {Path(d).resolve() for d in skip if d is not None}
        seen = {path.resolve()}  # linked subfolders are followed, each folder read once (no loops)
        files = []
        for folder, subfolders, names in os.walk(path, followlinks=True):
            keep = []
            for d in sorted(subfolders):
                real = Path(folder, d).resolve()
                if recursive and not d.startswith(".") and real not in skip_dirs and real not in seen:
                    seen.add(real)
                    keep.append(d)
            subfolders[:] = keep
            files += [Path(folder, n) for n in names if not n.startswith(".")
                      and Path(n).suffix.lower() in IMAGE_EXTENSIONS and Path(folder, n).is_file()]
        files.sort(key=lambda f: f.relative_to(path).parts)
        if not files:
            where = "folder or its subfolders" if recursive else "folder"
            raise PredictError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) in {where} {path}"
                               + ("" if recursive or not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
                                  else " (it has subfolders: add --recursive)"))
        return files
    if not path.exists():
        raise PredictError(f"input not found: {path}")
    return [path]


def output_places(files: list[Path], inputs: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """(output folder, output name) per input: the input's subfolder mirrored under ``out_dir``, a
    name distinct within that folder (``_output_stems``)."""
    root = Path(inputs) if Path(inputs).is_dir() else None
    rel = [f.parent.relative_to(root) if root is not None else Path() for f in files]
    groups: dict[Path, list[int]] = {}
    for i, r in enumerate(rel):
        groups.setdefault(r, []).append(i)
    places: list[tuple[Path, str]] = [(Path(), "")] * len(files)
    for sub, idx in groups.items():
        for i, stem in zip(idx, _output_stems([files[i] for i in idx])):
            places[i] = (Path(out_dir) / sub, stem)
    return places


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W, 3) RGB, turned upright by its EXIF orientation (as cv2.imread in Depth-Anything-V2's
    run.py and image viewers do: phone photos are stored sideways); one-line PredictError naming the
    file if it cannot be decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I", "F"):
                raise PredictError(f"cannot read image {path}: {img.mode} is not an 8-bit colour image")
            rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except FileNotFoundError:
        raise PredictError(f"input not found: {path}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, PredictError):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, Image.DecompressionBombError):
            msg = f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels, the most the image reader opens; downscale it"
        raise PredictError(f"cannot read image {path}: {msg}") from None
    return np.ascontiguousarray(rgb)


# The network sees the image with its short side at --input-size and the aspect ratio kept: an
# image longer than 16:1 (a strip, a wide panorama) would give a token count out of all proportion.
MAX_INPUT_AREA = 16


def network_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the shorter side `short_side`, the aspect ratio kept, both multiples of 14."""
    scale = short_side / min(height, width)
    return (max(PATCH, int(round(height * scale / PATCH)) * PATCH),
            max(PATCH, int(round(width * scale / PATCH)) * PATCH))


@torch.no_grad()
def predict_image(predictor: Predictor, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """Depth (H, W) float32 metres at the image's size, uncertainty (H, W) or None, network size."""
    h, w = rgb.shape[:2]
    nh, nw = network_size(h, w, predictor.input_size)
    if predictor.source == "official":
        # as Depth-Anything-V2's infer_image: the image in [0, 1] resized as floats, overshoot kept
        resized = cv2.resize(rgb.astype(np.float32) / 255.0, (nw, nh), interpolation=cv2.INTER_CUBIC)
        scale = 1.0
    else:  # as this project's validation stream, which its checkpoints were validated on
        resized, scale = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_CUBIC), 255.0
    x = torch.from_numpy(resized).permute(2, 0, 1)[None].to(predictor.device)
    out = predictor.model(normalize_images(x, scale))

    def back(t: torch.Tensor) -> np.ndarray:
        return upsample_depth(t, (h, w))[0].cpu().numpy().astype(np.float32)

    return back(out.depth), (back(out.uncertainty) if out.uncertainty is not None else None), (nh, nw)


def edge_step(height: int, width: int, net_height: int, net_width: int) -> int:
    """How far apart the edge filter compares pixels: the factor the prediction was resized up by
    (a jump spreads over that many image pixels), 1 for an image no larger than the network's input."""
    return max(1, math.ceil(max(height / net_height, width / net_width) - 1e-9))


# ------------------------------------------------------------------------------------ driving

@dataclass
class PointCloudOptions:
    fx: float | None = None
    fy: float | None = None
    cx: float | None = None
    cy: float | None = None
    fov: float = DEFAULT_FOV
    drop_beyond: float | None = None
    drop_sky: bool = False
    sky_mask: str | None = None  # a PNG (one image) or a folder of <stem>.png
    edge_threshold: float | None = None
    max_uncertainty: float | None = None

    def intrinsics(self, width: int, height: int) -> tuple[float, float, float, float]:
        from curriculum.pointcloud import intrinsics_from_fov

        if self.fx is None:
            if any(v is not None for v in (self.fy, self.cx, self.cy)):
                raise PredictError("--fy/--cx/--cy need --fx (or give none of them and use --fov)")
            return intrinsics_from_fov(width, height, self.fov)
        fy = self.fy if self.fy is not None else self.fx
        cx = self.cx if self.cx is not None else (width - 1) / 2.0
        cy = self.cy if self.cy is not None else (height - 1) / 2.0
        return float(self.fx), float(fy), float(cx), float(cy)


def _check_options(pc: PointCloudOptions | None, predictor: Predictor) -> None:
    if pc is None:
        return
    for name, v in (("--fx", pc.fx), ("--fy", pc.fy)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise PredictError(f"{name} must be a positive number, got {v}")
    for name, v in (("--cx", pc.cx), ("--cy", pc.cy)):
        if v is not None and not math.isfinite(v):  # a NaN centre makes every point NaN
            raise PredictError(f"{name} must be a finite number, got {v}")
    if not 0 < pc.fov < 180:
        raise PredictError(f"--fov must be in (0, 180) degrees, got {pc.fov}")
    if pc.drop_beyond is not None and not pc.drop_beyond > 0:
        raise PredictError(f"--drop-beyond must be positive, got {pc.drop_beyond}")
    if pc.edge_threshold is not None and not pc.edge_threshold > 0:
        raise PredictError(f"--drop-edges must be positive, got {pc.edge_threshold}")
    if pc.max_uncertainty is not None and not math.isfinite(pc.max_uncertainty):
        raise PredictError(f"--max-uncertainty must be a finite number, got {pc.max_uncertainty}")
    if pc.max_uncertainty is not None and not predictor.has_uncertainty:
        raise PredictError("--max-uncertainty: this checkpoint predicts no uncertainty "
                           "(train with model.uncertainty=true)")
    if pc.sky_mask is not None and not Path(pc.sky_mask).exists():
        raise PredictError(f"sky mask not found: {pc.sky_mask}")


def _sky_mask_for(pc: PointCloudOptions, image: Path, n_inputs: int, subfolder: Path = Path()) -> Path | None:
    if pc.sky_mask is None:
        return None
    mask = Path(pc.sky_mask)
    if mask.is_dir():  # a folder of masks mirrors the input folder's subfolders
        candidate = mask / subfolder / f"{image.stem}.png"
        if not candidate.is_file():
            raise PredictError(f"sky mask not found for {image}: {candidate}")
        return candidate
    if n_inputs > 1:
        raise PredictError(f"--sky-mask {mask} is one file for {n_inputs} images; give a folder of <name>.png masks")
    return mask


def _output_stems(files: list[Path]) -> list[str]:
    """A distinct output name per input (compared case-blind: the output folder may be), in input order."""
    stems = [f.stem.casefold() for f in files]
    # a.png and a.jpg in one folder would overwrite each other's outputs: they keep their extension
    names = [f.name.replace(".", "_") if stems.count(f.stem.casefold()) > 1 else f.stem for f in files]
    # which can meet another input's own stem (a.png -> a_png beside a_png.png): later ones get _2, _3, ...
    reserved, used, out = {n.casefold() for n in names}, set(), []
    for name in names:
        unique, k = name, 2
        while unique.casefold() in used or (unique != name and unique.casefold() in reserved):
            unique, k = f"{name}_{k}", k + 1
        used.add(unique.casefold())
        out.append(unique)
    return out


def _progress(done: int, total: int, start: float) -> str:
    """' [done/total, images/s, ETA]' for a run of several images, '' for one."""
    if total == 1:
        return ""
    rate = done / max(time.perf_counter() - start, 1e-9)
    return f" [{done}/{total}, {rate:.2f} img/s, ETA {tqdm.format_interval((total - done) / rate)}]"


def run_predict(checkpoint: str | os.PathLike, inputs: str | os.PathLike, out_dir: str | os.PathLike, *,
                encoder: str | None = None, max_depth: float | None = None, input_size: int | None = None,
                save_npy: bool = False, pointcloud: PointCloudOptions | None = None, sky_depth: float | None = None,
                vmin: float = 1.0, vmax: float | None = None, device: str | None = None,
                recursive: bool = False, log=print) -> list[dict]:
    """Predict every input image; returns one record per image (paths written, filter report).
    With ``recursive``, a folder's subfolders too: their outputs go to the same subfolders of ``out_dir``."""
    from curriculum.pointcloud import filter_points, format_filter_report, load_mask, write_ply
    from curriculum.viz import is_depth_png, save_depth_png

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise PredictError(f"--out {out_dir}: exists and is not a folder")
    files = list_inputs(inputs, recursive, skip=(out_dir, pointcloud.sky_mask if pointcloud else None))
    if Path(inputs).is_dir():  # earlier runs' depth maps in the folder are outputs, not photos
        earlier = [f for f in files if f.suffix.lower() == ".png" and is_depth_png(f)]
        if earlier:
            skipped = set(earlier)
            files = [f for f in files if f not in skipped]
        if earlier:
            log(f"skipped {len(earlier)} depth maps written by an earlier predict (e.g. {earlier[0]})")
        if not files:
            raise PredictError(f"no image in {inputs} but depth maps written by an earlier predict")
    places = output_places(files, inputs, out_dir)
    if Path(inputs).is_dir() and Path(out_dir).resolve() == Path(inputs).resolve():
        # the next run would read this run's depth PNGs as photos (and may overwrite an input named x_depth.png)
        raise PredictError(f"--out {out_dir} is the input folder: choose another folder for the outputs")
    # Every input and mask is decoded once before any output is written (and again when used,
    # so a large folder is never held in memory at once).
    sizes = [read_image(f).shape[:2] for f in files]
    predictor = load_predictor(checkpoint, encoder, max_depth, input_size, sky_depth, device)
    _check_options(pointcloud, predictor)
    for file, (h, w) in zip(files, sizes):
        nh, nw = network_size(h, w, predictor.input_size)
        if nh * nw > MAX_INPUT_AREA * predictor.input_size ** 2:  # attention memory grows with its square
            raise PredictError(f"{file}: {w}x{h} would enter the network as {nw}x{nh}, more than {MAX_INPUT_AREA} "
                               f"times the {predictor.input_size}x{predictor.input_size} area; crop it or give a "
                               "smaller --input-size")
    masks = [_sky_mask_for(pointcloud, f, len(files), folder.relative_to(out_dir)) if pointcloud else None
             for f, (folder, _) in zip(files, places)]
    for mask, size in zip(masks, sizes):
        if mask is not None:
            load_mask(mask, size)
    # intrinsics of every input now, so a bad one stops the run before any output
    intrinsics = [pointcloud.intrinsics(w, h) if pointcloud else None for h, w in sizes]
    default_vmax = vmax is None
    vmax = float(vmax if vmax is not None else predictor.max_depth)
    if not (math.isfinite(vmax) and vmax > vmin > 0):
        raise PredictError(f"colour range needs 0 < --vmin < --vmax, got {vmin:g}, {vmax:g}"
                           + (" (--vmax defaults to the model's max depth: give --vmin below it)" if default_vmax else ""))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    log(f"model: {predictor.source} {predictor.encoder}, range {predictor.min_depth:g}..{predictor.max_depth:g} m, "
        f"input short side {predictor.input_size}" + "".join(f"; {n}" for n in predictor.notes))
    records, start = [], time.perf_counter()
    for k, (file, (out, stem), mask, intr) in enumerate(zip(files, places, masks, intrinsics)):
        out.mkdir(parents=True, exist_ok=True)
        rgb = read_image(file)
        h, w = rgb.shape[:2]
        depth, unc, (nh, nw) = predict_image(predictor, rgb)
        rec: dict = {"input": str(file), "size": (h, w), "network_size": (nh, nw)}
        rec["png"] = str(save_depth_png(depth, out / f"{stem}_depth.png", vmin, vmax, title=file.name))
        if save_npy:
            rec["npy"] = str(out / f"{stem}_depth.npy")
            atomic_write(rec["npy"], lambda f: np.save(f, depth))
            if unc is not None:
                rec["uncertainty_npy"] = str(out / f"{stem}_uncertainty.npy")
                atomic_write(rec["uncertainty_npy"], lambda f: np.save(f, unc))
        log(f"{file}: {w}x{h} (network {nw}x{nh}), depth {np.nanmin(depth):.2f}..{np.nanmax(depth):.2f} m "
            f"-> {rec['png']}" + (f", {rec['npy']}" if save_npy else "") + _progress(k + 1, len(files), start))
        if pointcloud is not None:
            pc = pointcloud
            sky_mask = load_mask(mask, (h, w)) if mask is not None else None
            points, colours, report = filter_points(
                depth, rgb, intr,
                max_depth=pc.drop_beyond,
                sky_threshold=predictor.sky_depth if pc.drop_sky else None,
                sky_mask=sky_mask,
                edge_threshold=pc.edge_threshold,
                edge_step=edge_step(h, w, nh, nw),
                uncertainty=unc if pc.max_uncertainty is not None else None,
                max_uncertainty=pc.max_uncertainty,
            )
            rec["ply"] = str(write_ply(out / f"{stem}.ply", points, colours))
            rec["filter_report"] = report
            rec["intrinsics"] = intr
            what = []
            if pc.drop_sky:
                what.append(f"sky = predicted >= {predictor.sky_depth:g} m")
            if mask is not None:
                what.append(f"sky mask {mask}")
            log(f"point cloud {rec['ply']} (fx {intr[0]:.1f} fy {intr[1]:.1f} cx {intr[2]:.1f} cy {intr[3]:.1f}"
                + "".join(f"; {t}" for t in what) + "):")
            log(format_filter_report(report))
        records.append(rec)
    return records
