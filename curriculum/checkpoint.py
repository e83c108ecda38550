"""Checkpoints: atomic writes, safe reads, the metadata contract, model restore for eval/predict."""
from __future__ import annotations

import hashlib
import os
import time
import pickle
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from data_prep.schema import SCHEMA_VERSION

META_KEY = "curriculum"
MODEL_FIELDS = ("encoder", "head", "min_depth", "max_depth", "uncertainty")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, reported in one line naming the file."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary name in the same folder and renames: a crash mid-write leaves the
    previous checkpoint intact and never a truncated file under the final name."""

    save_seconds = 0.0  # spent writing, in all: training's images/s leaves it out

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        start = time.perf_counter()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self.save_seconds += time.perf_counter() - start


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint with weights_only=True (or a .safetensors state dict); one-line errors
    for missing or corrupt files.
    ``mmap`` maps the file instead of reading it: for a look at its metadata and step before
    Lightning reads the whole of it again (a vitl checkpoint with AdamW state is several GB)."""
    path = Path(path)
    if path.is_dir():
        inside = path / "last.ckpt" if path.name == "checkpoints" or (path / "last.ckpt").is_file() \
            else path / "checkpoints" / "last.ckpt"
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (a run keeps its own in {inside})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    magic = head[:4]
    if not head.strip(b"\0"):  # empty, or zeros where a crash left no data
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (empty or zero-filled)")
    if len(magic) < 4:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (only {len(head)} bytes)")
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return _read_safetensors(path)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip archive, or its older pickle format
        raise CheckpointError(f"{path}: not a torch checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if first.startswith("Weights only load failed"):  # torch's advice to load unsafely would not help
            first = "unpickling refused: not tensors and plain containers"
        first = first.split(". ")[0]  # the reason; torch's advice after it does not fit one line
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(ckpt).__name__})")
    return ckpt


def _read_safetensors(path: Path) -> dict:
    """A .safetensors file (timm's and the hubs' weight format): a flat state dict, no metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({first[:200]})") from None


def taught_far_target(meta: dict) -> float | None:
    """The largest far target a checkpoint's weights were taught the sky and beyond-range pixels
    at: by the stages of its own recipe (unclipped or mixed policies with a far weight) or, through
    init_from, by its ancestors. None if no stage on the way supervised them."""
    from curriculum.masks import DEFAULT_FAR_TARGET

    targets = [float(meta["parent_far_target"])] if meta.get("parent_far_target") is not None else []
    for stage in (meta.get("recipe") or {}).get("stages") or []:
        policy = stage.get("policy") or {}
        if policy.get("name") in ("unclipped", "mixed") and float(policy.get("far_weight", 1.0)) > 0:
            targets.append(float(policy.get("far_target", DEFAULT_FAR_TARGET)))
    return max(targets) if targets else None


def metadata(ckpt: dict, path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, its ``model`` holding every field of ``MODEL_FIELDS``."""
    meta = ckpt.get(META_KEY)
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{path}: no '{META_KEY}' metadata; not a checkpoint of this project")
    model = meta["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: malformed '{META_KEY}' metadata (its model is a {type(model).__name__}, "
                              "not a mapping)")
    model.setdefault("uncertainty", False)  # files from before the uncertainty head
    missing = [k for k in MODEL_FIELDS if k not in model]
    if missing:
        raise CheckpointError(f"{path}: malformed '{META_KEY}' metadata (no model field {missing[0]!r})")
    return meta


def build_metadata(model_meta: dict, policy: dict, stage: str, recipe: dict, extra: dict | None = None) -> dict:
    return {
        "model": dict(model_meta),
        "policy": dict(policy),
        "stage": stage,
        "recipe": recipe,
        "schema_version": SCHEMA_VERSION,
        **(extra or {}),
    }


def check_same_model(expected: dict, found: dict, source: str) -> None:
    """Stage 2 must fine-tune the architecture and head that stage 1 trained."""
    diffs = [f"{k}: {found.get(k)!r} in checkpoint vs {expected.get(k)!r} in recipe" for k in MODEL_FIELDS
             if found.get(k) != expected.get(k)]
    if diffs:
        raise CheckpointError(f"{source}: model mismatch ({'; '.join(diffs)})")


def model_state(ckpt: dict, prefix: str = "model.") -> dict[str, torch.Tensor]:
    state = ckpt.get("state_dict", {})
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # A compiled model's keys may carry `_orig_mod.`; weights are always stored without it.
    return {k.replace("_orig_mod.", ""): v for k, v in out.items()}


def fitting_weights(model: torch.nn.Module, ckpt: dict, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights, checked to fit ``model`` key for key and shape for shape:
    CheckpointError in one line otherwise (torch's own error lists every tensor, line by line)."""
    from curriculum.model import _check_keys

    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: malformed state_dict (not a mapping of tensors)")
    weights = model_state(ckpt)
    try:
        _check_keys(f"{path}: weights do not fit the recorded model", weights, model.state_dict())
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return weights


def load_weights(model: torch.nn.Module, ckpt: dict, path: str | os.PathLike) -> None:
    model.load_state_dict(fitting_weights(model, ckpt, path), strict=True)


def load_model(path: str | os.PathLike, ckpt: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Model and metadata of one of this project's checkpoints (``ckpt``: the file, already read),
    for eval and predict."""
    from curriculum.model import build_model

    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    meta = metadata(ckpt, path)
    model = build_model({k: meta["model"][k] for k in MODEL_FIELDS})
    load_weights(model, ckpt, path)
    return model.eval(), meta


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
