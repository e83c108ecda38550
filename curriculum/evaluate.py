"""Evaluation of a checkpoint on validation shards: near range, far range, sky, phantom rate."""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from curriculum.checkpoint import load_model
from curriculum.config import LoggingConfig
from curriculum.data import DataError, ValStream, expand_shards, normalize_images
from curriculum.layers import upsample_depth
from curriculum.metrics import MIN_PIXELS, MetricAccumulator, eval_crop
from curriculum.module import EVAL_MAX_DEPTH
from data_prep.files import atomic_write_text

METRIC_COLUMNS = ("d1", "abs_rel", "sq_rel", "rmse", "rmse_log", "silog")
GROUPS = (("near (<= 80 m)", "near"), ("  [0, 20)", "near/0_20"), ("  [20, 40)", "near/20_40"),
          ("  [40, 80]", "near/40_80"), ("far (> 80 m)", "far"))


PANEL_VMIN = 1.0  # bottom of the depth panels' log colour scale, metres


def protocol_text(protocol: str, min_depth: float, max_depth: float) -> str:
    crop = {"kitti_garg": "Garg crop", "kitti_eigen": "Eigen crop", "nyu": "NYU crop"}.get(protocol, "no crop")
    return (f"protocol {protocol}: {crop}; near range {min_depth:g}..{max_depth:g} m; far = measured > "
            f"{max_depth:g} m; sky = sky mask or beyond sensor range; metrics per image (an image counts in a range "
            f"with >= {MIN_PIXELS} pixels there), then averaged over images; phantom rate over pixels; predictions "
            f"unclamped (as Depth-Anything-V2; monodepth2 and ZoeDepth clamp them to {max_depth:g} m for KITTI)")


def load_official_for_eval(path: str, ckpt: dict, encoder: str | None, max_depth: float | None):
    """An official Depth-Anything-V2 metric checkpoint as (model, metadata) for ``evaluate``: it is
    fed its images as Depth-Anything-V2's own evaluation feeds them (a cubic resize of floats in
    [0, 1], overshoot kept), where this project's checkpoints get the validation stream's uint8
    resize they were validated with."""
    from curriculum.predict import load_official_file

    model = load_official_file(path, ckpt, encoder, max_depth)
    return model, {"model": model.metadata(), "stage": "official Depth-Anything-V2", "float_input": True}


def first_frame_size(urls: list[str]) -> tuple[int, int] | None:
    """(height, width) the first sample's meta.json records; None when it cannot be read (the
    stream then reports what is wrong)."""
    from curriculum.data import _raw_samples

    samples = _raw_samples(urls, lambda url, why: None)
    try:
        for raw in samples:
            try:
                meta = json.loads(raw["meta.json"])
                return int(meta["height"]), int(meta["width"])
            except (KeyError, ValueError, TypeError, RecursionError):
                continue
    except (OSError, DataError):
        return None
    finally:
        samples.close()
    return None


def input_size_for(frame: tuple[int, int] | None, recipe: tuple[int, int]) -> tuple[int, int]:
    """The network input for frames of size ``frame``: the recipe's validation size where its aspect
    ratio is the frames' (within 10 %), else the frames' aspect ratio at the recipe's shorter side,
    both sides multiples of 14, as Depth-Anything-V2's evaluation and ``predict`` resize (518 x 1722
    for a KITTI frame of 1242 x 375 given 518 x 518). An extreme aspect ratio keeps the recipe's size."""
    from curriculum.predict import MAX_INPUT_AREA, network_size

    if frame is None or min(frame) < 1:
        return recipe
    (fh, fw), (rh, rw) = frame, recipe
    if abs(math.log((fw / fh) / (rw / rh))) <= 0.1:
        return recipe
    short = min(rh, rw)
    h, w = network_size(fh, fw, short)
    return (h, w) if h * w <= MAX_INPUT_AREA * short * short else recipe


@torch.no_grad()
def evaluate(checkpoint: str, shards: str, protocol: str = "synthetic", batch_size: int = 4,
             height: int | None = None, width: int | None = None, device: str | None = None,
             max_images: int = 0, model=None, meta=None, progress: bool = True, examples: int = 0) -> dict:
    """Metrics of a checkpoint over the shards. The network input is ``height`` x ``width``, by
    default ``input_size_for`` the first frame. ``examples`` > 0 also keeps that many depth panels
    (rgb | ground truth | prediction | error) under ``report["examples"]`` for ``save_figures``."""
    if model is None:
        model, meta = load_model(checkpoint)
    data_cfg = meta.get("recipe", {}).get("data", {})
    urls = expand_shards(shards)
    recipe_size = (int(data_cfg.get("val_height", 518)), int(data_cfg.get("val_width", 518)))
    if height is None and width is None:
        height, width = input_size_for(first_frame_size(urls), recipe_size)
    height = height or recipe_size[0]
    width = width or recipe_size[1]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    float_input = bool(meta.get("float_input", False))
    stream = ValStream(urls, 0, 1, batch_size, height, width, max_images=max_images, float_images=float_input)
    acc = MetricAccumulator(min_depth=1e-3, max_depth=EVAL_MAX_DEPTH)
    # the colour range the run's own panels used (logging.depth_vmax)
    vmax = float(meta.get("recipe", {}).get("logging", {}).get("depth_vmax", LoggingConfig.depth_vmax))
    start, n, bad, stretched, panels = time.perf_counter(), 0, 0, set(), []
    bar = tqdm(stream, desc="eval", unit="batch", disable=not progress)
    for batch in bar:
        bad += int(batch["bad_samples"])
        pred = model(normalize_images(batch["image"].to(device), 1.0 if float_input else 255.0)).depth.float().cpu()
        for i in range(pred.shape[0]):
            h, w = (int(v) for v in batch["size"][i])
            if abs(math.log((w / h) / (width / height))) > 0.1 and (h, w) not in stretched:
                stretched.add((h, w))
                warnings.warn(f"{w}x{h} images are resized to the network input {width}x{height}, changing their "
                              f"aspect ratio; give --height/--width of the same shape", stacklevel=2)
            p = upsample_depth(pred[i][None], (h, w))
            valid = batch["valid"][i : i + 1, :h, :w] & eval_crop(h, w, protocol)[None]
            acc.update(p, batch["depth"][i : i + 1, :h, :w], batch["sky"][i : i + 1, :h, :w], valid)
            if len(panels) < examples:
                panels.append(image_panel(batch, i, p[0], vmax, valid=valid[0]))
            n += 1
        bar.set_postfix(img_per_s=f"{n / (time.perf_counter() - start):.1f}")
    if n == 0:
        raise DataError(f"{shards}: no image evaluated ({bad} bad samples skipped)")
    results = acc.compute()
    return {
        "checkpoint": str(checkpoint),
        "shards": shards,
        "protocol": protocol,
        "protocol_text": protocol_text(protocol, 1e-3, EVAL_MAX_DEPTH),
        "model": meta.get("model", {}),
        "stage": meta.get("stage"),
        "input_size": [height, width],
        "input_resize": "float cubic" if float_input else "uint8 cubic",
        "depth_range_shown": [PANEL_VMIN, vmax],  # the example panels' colour range
        "bad_samples": bad,
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in results.items()},
        **({"examples": panels} if examples else {}),
    }


def image_panel(batch: dict, i: int, pred: torch.Tensor, vmax: float, rgb_key: str = "image",
                valid: torch.Tensor | None = None):
    """rgb | ground truth (sky at its far value) | prediction | error of image ``i`` of a batch, at
    the size of ``pred`` (H, W): evaluation's example panels and the training run's logged ones."""
    from curriculum.viz import depth_panel

    h, w = pred.shape
    gt = batch["depth"][i, :h, :w].detach().float().cpu().clone()
    gt[batch["sky"][i, :h, :w].cpu()] = float("inf")
    rgb = batch[rgb_key][i].permute(1, 2, 0).cpu().numpy()  # depth_panel brings it to (h, w)
    if rgb.dtype != np.uint8:  # floats in [0, 1] (an official checkpoint's input)
        rgb = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return depth_panel(rgb, gt.numpy(), pred.detach().float().cpu().numpy(), vmin=PANEL_VMIN, vmax=vmax,
                       valid=None if valid is None else valid.cpu().numpy())


def save_figures(report: dict, stem: str | os.PathLike) -> list[str]:
    """``<stem>.png``: abs_rel per depth range and the phantom rates as bar charts; and
    ``<stem>_examples.png``: the report's depth panels, one per row (when it kept any)."""
    from matplotlib.figure import Figure

    from curriculum.viz import save_figure

    m, stem = report["metrics"], str(stem)
    fig = Figure(figsize=(10.0, 3.8), dpi=100, layout="constrained")
    fig.suptitle(f"{checkpoint_label(report)} on {int(m.get('images') or 0)} images ({report['protocol']})", parse_math=False)
    charts = (("abs_rel per range", [(label.strip(), m.get(f"{g}/abs_rel")) for label, g in GROUPS]),
              ("phantom rate (far and sky pixels predicted within 80 m)",
               [("all", m.get("phantom_rate")), ("far", m.get("far/phantom_rate")), ("sky", m.get("sky/phantom_rate"))]))
    for k, (title, bars) in enumerate(charts):
        ax = fig.add_subplot(1, 2, k + 1)
        values = [np.nan if v is None else float(v) for _, v in bars]
        ax.bar(range(len(bars)), values, color="C0" if k == 0 else "C3")
        ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize="small")
        ax.set_xlim(-0.6, len(bars) - 0.4)  # every slot whole, also an empty last one ("n/a" at its edge)
        for x, v in enumerate(values):
            ax.annotate("n/a" if not np.isfinite(v) else f"{v:.3f}", (x, 0 if not np.isfinite(v) else v),
                        ha="center", va="bottom", fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        if k == 1:
            ax.set_ylim(0.0, 1.05)  # rates: the same scale in every report, so two can be compared by eye
    written = [save_figure(fig, f"{stem}.png")]
    panels = report.get("examples") or []
    if panels:
        vmin, vmax = report["depth_range_shown"]
        written.append(save_panels(panels, f"{stem}_examples.png", checkpoint_label(report), vmin, vmax))
    return [str(p) for p in written]


PANEL_LABELS = ("rgb", "ground truth", "prediction", "abs rel error (black 0, pale >= 0.5)")


def save_panels(panels, path, label: str, vmin: float, vmax: float):
    """Panels of ``image_panel`` (rgb | ground truth | prediction | error, each a quarter), one per
    row, with column titles and the depth colour bar in metres, as a figure at ``path``."""
    from curriculum.viz import side_by_side

    images = []
    for panel in panels:
        w = panel.shape[1] // 4
        images += [panel[:, j * w:(j + 1) * w] for j in range(4)]
    return side_by_side(images, list(PANEL_LABELS) * len(panels), path, ncols=4, depth_bar=(vmin, vmax),
                        title=f"{label}: depth on a log colour scale {vmin:g}..{vmax:g} m (sky and beyond range at "
                              "the top colour, grey = no measurement); error |pred - gt| / gt")


def checkpoint_label(report: dict) -> str:
    """The run folder and stage a report's checkpoint comes from, e.g. 'demo/pretrain/last.ckpt (pretrain)'."""
    path = Path(report["checkpoint"])
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    shown = Path(*run.parts[-2:], path.name) if run.parts else Path(path.name)
    return str(shown) + (f" ({report['stage']})" if report.get("stage") else "")


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def format_table(report: dict) -> str:
    m = report["metrics"]
    lines = [report["protocol_text"], f"images: {int(m.get('images') or 0)}, each resized to "
             f"{report['input_size'][1]}x{report['input_size'][0]} for the network"
             + (" (as floats, as Depth-Anything-V2 evaluates)" if report.get("input_resize") == "float cubic" else "")
             + (f"; {report['bad_samples']} bad samples skipped" if report.get("bad_samples") else "")]
    nonfinite = int(m.get("nonfinite_pixels") or 0)
    if nonfinite:  # else ranges left without finite predictions would read "n/a" like ranges without images
        lines.append(f"warning: {nonfinite} predicted pixels are not finite (NaN or inf): left out of the error "
                     "metrics, counted as phantoms on far and sky pixels")
    # a space before each column whatever its width: large errors (56.3519, 43095.3079) ran together
    lines.append(f"{'range':<16}" + "".join(f" {c:>10}" for c in METRIC_COLUMNS) + f" {'images':>8}")
    for label, group in GROUPS:
        count = m.get(f"{group}/images")
        lines.append(f"{label:<16}" + "".join(f" {_fmt(m.get(f'{group}/{c}')):>10}" for c in METRIC_COLUMNS)
                     + f" {int(count or 0):>8}")
    lines.append(f"phantom rate (gt beyond 80 m or sky, predicted within 80 m): {_fmt(m.get('phantom_rate'))}"
                 f"  far: {_fmt(m.get('far/phantom_rate'))}  sky: {_fmt(m.get('sky/phantom_rate'))}")
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
