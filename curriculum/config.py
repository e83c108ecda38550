"""Recipes: an OmegaConf structured schema, composed over recipes/base.yaml.

`load_recipe(files, overrides)` merges schema defaults <- base.yaml <- each file <- `key=value`
overrides, and fails before any heavy work with one line naming the offending key (plus the
closest valid key when the name is unknown).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class RecipeError(ValueError):
    """A recipe problem, reported as one line naming the key."""


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 0
    overwrite: bool = False  # replace a finished or interrupted run in out_dir instead of refusing


@dataclass
class DataConfig:
    train_shards: str = MISSING  # brace pattern, glob, or `pipe:` command per shard
    val_shards: str = MISSING
    batch_size: int = 8  # per rank
    val_batch_size: int = 8
    num_workers: int = 2
    crop_height: int = 126  # random crop of a lower-bound resize, multiples of 14
    crop_width: int = 378
    val_height: int = 126  # validation images are resized to this (depth stays native)
    val_width: int = 378
    scale_jitter: float = 0.0  # extra random zoom in [1, 1 + scale_jitter]
    hflip: bool = True
    color_jitter: float = 0.0  # brightness/contrast/saturation amplitude, image only
    # Resize the crops on the training device instead of in the loader workers: a worker then
    # ships half the bytes and skips the resize. Depth and sky come out identical, the image
    # within one grey level (two with colour jitter, which follows the resize there too).
    device_resize: bool = False
    shuffle_buffer: int = 256
    epoch_samples: int = 0  # samples per epoch over all ranks; 0 = the shard index total
    max_bad_samples: int = 100  # per worker; beyond it the run stops naming the shard
    val_max_images: int = 0  # 0 = every validation image


@dataclass
class ModelConfig:
    encoder: str = "tiny"  # tiny | vits | vitb | vitl
    head: str = "log"  # log (covers the unclipped range) | sigmoid (Depth-Anything-V2)
    min_depth: float = 0.1
    max_depth: float = 1000.0  # top of the head's range, not the loss mask
    uncertainty: bool = False
    pretrained: str = ""  # local encoder/official checkpoint; "" = random init
    compile: bool = False  # torch.compile: model + loss as one training graph; the model for validation
    # default | max-autotune-no-cudagraphs (autotuned matmuls with fused epilogues; slower to compile)
    compile_mode: str = "default"
    grad_checkpointing: bool = False
    channels_last: bool = False


@dataclass
class LossConfig:
    silog_lambda: float = 0.5
    grad_weight: float = 0.0
    nll_weight: float = 1.0  # only used when the model predicts uncertainty


@dataclass
class OptimConfig:
    lr: float = 5e-6  # encoder learning rate
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    poly_power: float = 0.9
    fused: bool = False
    grad_clip: float = 0.0


@dataclass
class StageConfig:
    name: str = MISSING
    steps: int = MISSING
    policy: Dict[str, Any] = field(default_factory=lambda: {"name": "unclipped"})
    rewarm_steps: int = 0  # linear lr re-warm-up at the start of this stage


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    val_every_steps: int = 0  # 0 = once per epoch
    log_every_steps: int = 10
    ckpt_every_steps: int = 500  # last.ckpt every N steps (what a kill -9 can lose); 0 = only at the end
    progress: bool = True
    max_nonfinite_steps: int = 5  # consecutive skipped (non-finite) steps before the run stops
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms (fixed crop sizes)


@dataclass
class LoggingConfig:
    project: str = "curriculum-depth"
    entity: str = ""  # W&B user or team; "" = the account's default entity
    group: str = ""  # links the stages of one experiment; "" = run.name
    # auto: WANDB_MODE if set, else online iff an API key is configured | online | offline | disabled
    mode: str = "auto"
    image_every_steps: int = 200
    depth_vmax: float = 700.0  # fixed colour range of depth panels
    parent_run: str = ""  # filled in for stage 2: the stage-1 run id
    parent_checkpoint_sha256: str = ""


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: List[StageConfig] = field(default_factory=list)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init_from: str = ""  # stage-2 start: weights and metadata of a checkpoint, fresh optimizer
    resume: str = ""  # full resume of an interrupted run (same stage schedule)


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}{k}"
            keys.append(path)
            keys.extend(_valid_keys(node._get_node(k), path + "."))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            keys.append(f"{prefix}{i}")
            keys.extend(_valid_keys(node._get_node(i), f"{prefix}{i}."))
    return keys


def _check_keys(user: Any, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Unknown keys are an error with the closest valid key as a hint."""
    if not isinstance(user, dict):
        return
    for key, value in user.items():
        path = f"{prefix}{key}"
        if key not in schema.keys():
            raise unknown_key(path, _valid_keys(schema, prefix) + _valid_keys(OmegaConf.structured(Recipe)), source)
        child = schema._get_node(key)
        # omegaconf's own words for these ("Cannot merge incompatible container types") name no key;
        # a ${...} reference is resolved later, and checked then
        if isinstance(value, str) and "${" in value:
            continue
        if isinstance(child, ListConfig) and value is not None and not isinstance(value, list):
            raise RecipeError(f"{source}: {path}: expected a list, got {_kind(value)}")
        if isinstance(child, DictConfig) and value is not None and not isinstance(value, dict):
            raise RecipeError(f"{source}: {path}: expected a mapping of keys, got {_kind(value)}")
        if isinstance(child, DictConfig) and not _is_free_dict(child):
            _check_keys(value, child, source, path + ".")
        elif isinstance(child, ListConfig) and path == "stages" and isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(item, OmegaConf.structured(StageConfig), source, f"stages.{i}.")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list"}.get(type(value), f"the value {value!r}")


def _is_free_dict(node: DictConfig) -> bool:
    return node._metadata.object_type in (None, dict)


def parse_override(text: str) -> tuple[str, Any, str]:
    """`key=value` as (key, the value parsed as YAML, the value's text as typed)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = OmegaConf.create({"v": raw}) if raw == "" else OmegaConf.create(f"v: {raw}")
        return key.strip(), OmegaConf.to_container(value)["v"], raw.strip()
    except Exception as exc:  # yaml errors come in many types; all mean "not a value"
        raise RecipeError(f"command line: cannot parse the value of '{text}' ({type(exc).__name__})") from None


def as_node_type(node: Any, value: Any, raw: str) -> Any:
    """A command-line value in the type of the schema's node, where omegaconf would convert it
    itself with a deprecation warning: lr=1 is 1.0 (lr=nan NaN), a number or boolean for a text
    key (trainer.precision=32, run.name=2026) is the text as typed (in a list of texts, as
    written back), a quoted whole number for a count ('8') is that number, and a switch takes
    true/false or 1/0 (omegaconf would read any number, -1 or 16, as true)."""
    if isinstance(node, FloatNode) and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            return value  # not a number: omegaconf names the key
    if isinstance(node, StringNode) and isinstance(value, (bool, int, float)):
        return raw
    if isinstance(node, ListConfig) and node._metadata.element_type is str and isinstance(value, list):
        return [str(v) if isinstance(v, (bool, int, float)) else v for v in value]  # arms=[1] is ['1']
    if isinstance(node, IntegerNode) and isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    if isinstance(node, BooleanNode) and not isinstance(value, bool) and value is not None:
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expects true or false, got {raw}")
    return value


def _set_override(cfg: DictConfig, key: str, value: Any, raw: str) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, ListConfig):
            child = node[int(part)] if part.isdigit() and int(part) < len(node) else None
        else:
            child = node._get_node(part) if part in node.keys() else None
        if not isinstance(child, (DictConfig, ListConfig)):
            _unknown(".".join(parts[: i + 1]), "command line", cfg)
        node = child
    last = parts[-1]
    prefix = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    if isinstance(node, ListConfig):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"command line: no list item '{key}'")
        item_type = node._metadata.element_type
        if isinstance(value, dict) and dataclasses.is_dataclass(item_type):  # stages.1={name: ..., steps: ...}
            _check_keys(value, OmegaConf.structured(item_type), "command line", f"{key}.")
            value = OmegaConf.merge(OmegaConf.structured(item_type), value)
        node[int(last)] = value
        return
    if last not in node.keys() and not _is_free_dict(node):
        _unknown(key, "command line", cfg)
    child = node._get_node(last) if last in node.keys() else None
    free_child = isinstance(child, DictConfig) and _is_free_dict(child)  # a policy: replaced whole
    if isinstance(value, (dict, list)) and not _is_free_dict(node) and not free_child:
        # a whole section or list, as a recipe file could give it (stages=[...]): merged, so that
        # its items take the schema's types and defaults, with its keys checked first
        _check_keys({last: value}, node, "command line", prefix)
        node.merge_with({last: value})
        return
    node[last] = as_node_type(child, value, raw)


def unknown_key(key: str, valid: list[str], source: str) -> RecipeError:
    """One line naming an unknown key and the closest valid one."""
    hint = difflib.get_close_matches(key, valid, n=1)
    return RecipeError(f"{source}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def _unknown(key: str, source: str, cfg: DictConfig) -> None:
    raise unknown_key(key, _valid_keys(cfg), source)


def load_yaml_mapping(path: Path, what: str = "recipe") -> dict:
    """A yaml file that must hold a mapping; every problem is one RecipeError line naming the file."""
    if not path.is_file():
        looks_like_key = path.suffix not in (".yaml", ".yml") and not path.parent.parts and "." in path.name
        raise RecipeError(f"{what} file not found: {path}"
                          + (f" (an override needs a value: {path}=...)" if looks_like_key else ""))
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # yaml syntax errors carry multi-line context; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else f"{type(exc).__name__}, not a mapping of keys"
        raise RecipeError(f"{path}: cannot parse: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} file must be a mapping of keys, got {type(data).__name__}")
    return data


def _one_line(exc: OmegaConfBaseException, source: str) -> RecipeError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    return RecipeError(f"{source}: key '{key}': {msg}" if key else f"{source}: {msg}")


def resolved(cfg: DictConfig, what: str, where: str) -> dict:
    """`cfg` as plain containers, with every ${...} interpolation resolved and no ??? left; a
    RecipeError (one line) names the key otherwise (`what` failed; set the value in `where`)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        missing = sorted(re.sub(r"\[(\d+)\]", r".\1", k) for k in OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as exc:
        raise _one_line(exc, what) from None
    if missing:
        raise RecipeError(f"missing required value '{missing[0]}' (set it in {where} or as {missing[0]}=...)")
    return plain


def load_recipe(files: list[str | Path], overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose a recipe; raise RecipeError (one line) on any unknown key, bad type or missing value."""
    cfg = OmegaConf.structured(Recipe)
    sources = [RECIPES_DIR / "base.yaml"] + [Path(f) for f in files]
    seen = set()
    for path in sources:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        data = load_yaml_mapping(path)
        _check_keys(data, cfg, str(path))
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as exc:
            raise _one_line(exc, str(path)) from None
        except (TypeError, ValueError) as exc:  # e.g. a mapping where the schema has a list
            raise RecipeError(f"{path}: {str(exc).splitlines()[0]}") from None
    for text in overrides:
        key, value, raw = parse_override(text)
        try:
            _set_override(cfg, key, value, raw)
        except OmegaConfBaseException as exc:
            raise _one_line(exc, "command line") from None
        except RecipeError:
            raise
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            # e.g. a key path through a value that an earlier override turned into a scalar
            raise RecipeError(f"command line: '{text}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    resolved(cfg, "recipe", "a recipe")
    try:
        validate(cfg)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, "recipe") from None
    OmegaConf.set_readonly(cfg, False)
    return cfg


# torch.compile modes a training step can use; the CUDA-graph modes are left out (the optimizer
# step and the host-side loop run outside the compiled step).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16")  # "bf16" is Lightning's name for bf16-mixed


MAX_SEED = 2**32 - 1


def validate(cfg: DictConfig) -> None:
    """Semantic checks that the schema's types cannot express."""
    from curriculum.masks import build_policy
    from curriculum.model import ENCODER_SPECS

    if not cfg.stages:
        raise RecipeError("stages: a recipe needs at least one stage")
    names, policies = set(), []
    for i, stage in enumerate(cfg.stages):
        if stage.steps <= 0:
            raise RecipeError(f"stages.{i}.steps: must be positive, got {stage.steps}")
        if stage.name in names:
            raise RecipeError(f"stages.{i}.name: duplicate stage name '{stage.name}'")
        names.add(stage.name)
        try:
            policies.append(build_policy(OmegaConf.to_container(stage.policy)))
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"stages.{i}.policy: {exc}") from None
    if cfg.model.encoder not in ENCODER_SPECS:
        raise RecipeError(
            f"model.encoder: unknown encoder '{cfg.model.encoder}' (choose from {', '.join(ENCODER_SPECS)})"
        )
    if cfg.model.compile_mode not in COMPILE_MODES:
        raise RecipeError(f"model.compile_mode: unknown mode '{cfg.model.compile_mode}' "
                          f"(choose from {', '.join(COMPILE_MODES)})")
    if cfg.model.head not in ("log", "sigmoid"):
        raise RecipeError(f"model.head: unknown head '{cfg.model.head}' (choose from log, sigmoid)")
    for key in ("crop_height", "crop_width", "val_height", "val_width"):
        if cfg.data[key] <= 0 or cfg.data[key] % 14:
            raise RecipeError(f"data.{key}: must be a positive multiple of 14, got {cfg.data[key]}")
    for key in ("batch_size", "val_batch_size"):
        if cfg.data[key] <= 0:
            raise RecipeError(f"data.{key}: must be positive, got {cfg.data[key]}")
    if cfg.data.num_workers < 0:
        raise RecipeError(f"data.num_workers: must be >= 0, got {cfg.data.num_workers}")
    if cfg.logging.mode not in ("auto", "online", "offline", "disabled"):
        raise RecipeError(f"logging.mode: unknown mode '{cfg.logging.mode}' (auto, online, offline, disabled)")
    for key in ("project", "entity"):
        _check_wandb_name(f"logging.{key}", cfg.logging[key], required=(key == "project"))
    for key in ("val_every_steps", "ckpt_every_steps"):
        if cfg.trainer[key] < 0:
            raise RecipeError(f"trainer.{key}: must be >= 0 (0 = {'once per epoch' if key[0] == 'v' else 'only at the end'}), "
                              f"got {cfg.trainer[key]}")
    for key in ("log_every_steps", "max_nonfinite_steps", "num_nodes"):
        if cfg.trainer[key] < 1:
            raise RecipeError(f"trainer.{key}: must be >= 1, got {cfg.trainer[key]}")
    if cfg.trainer.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise RecipeError(f"trainer.accelerator: '{cfg.trainer.accelerator}' is not one of auto, cpu, gpu, cuda")
    _check_devices(cfg.trainer.devices)
    if cfg.trainer.strategy not in ("auto", "ddp"):
        # the checkpoint, metrics and summary are written by the launching process after fit, which
        # a spawning strategy leaves untrained; other strategies are untested with the position gather
        raise RecipeError(f"trainer.strategy: '{cfg.trainer.strategy}' is not supported (auto, or ddp: Lightning "
                          "launches one process per device)")
    if cfg.trainer.precision not in PRECISIONS:
        why = ("fp16 needs loss scaling, which fights the non-finite step skip" if str(cfg.trainer.precision).startswith("16")
               else "the loss and the final activation are kept in fp32 under mixed precision only")
        raise RecipeError(f"trainer.precision: '{cfg.trainer.precision}' is not supported (choose from "
                          f"{', '.join(PRECISIONS)}; {why})")
    _check_finite(cfg)
    if not 0 <= cfg.run.seed <= MAX_SEED:  # the range torch, numpy and Lightning's seeding accept
        raise RecipeError(f"run.seed: must lie in [0, {MAX_SEED}], got {cfg.run.seed}")
    if not cfg.optim.lr > 0 or not cfg.optim.head_lr_mult > 0:
        raise RecipeError(f"optim.lr and optim.head_lr_mult: must be positive, got {cfg.optim.lr}, {cfg.optim.head_lr_mult}")
    for section, key in _NON_NEGATIVE:
        if cfg[section][key] < 0:
            raise RecipeError(f"{section}.{key}: must be >= 0, got {cfg[section][key]}")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg.optim[key] < 1:
            raise RecipeError(f"optim.{key}: must lie in [0, 1), got {cfg.optim[key]}")
    if not cfg.data.color_jitter < 1:  # a factor 1 - amount at or below 0 blacks out or inverts the image
        raise RecipeError(f"data.color_jitter: must lie in [0, 1), got {cfg.data.color_jitter}")
    if not cfg.logging.depth_vmax > 0:
        raise RecipeError(f"logging.depth_vmax: must be positive, got {cfg.logging.depth_vmax}")
    if not cfg.loss.silog_lambda <= 1:
        # above 1 the variance term can go negative: the loss then sits at its floor with no gradient
        raise RecipeError(f"loss.silog_lambda: must lie in [0, 1], got {cfg.loss.silog_lambda}")
    if cfg.optim.warmup_steps > total_steps(cfg):  # the rate would never reach its value
        raise RecipeError(f"optim.warmup_steps: {cfg.optim.warmup_steps} is longer than the run's "
                          f"{total_steps(cfg)} steps")
    for i, stage in enumerate(cfg.stages):
        if stage.rewarm_steps < 0:
            raise RecipeError(f"stages.{i}.rewarm_steps: must be >= 0, got {stage.rewarm_steps}")
        if i == 0 and stage.rewarm_steps > 0:  # it would multiply with optim.warmup_steps' ramp
            raise RecipeError(f"stages.0.rewarm_steps: {stage.rewarm_steps}, but the first stage follows no switch; "
                              "its warm-up is optim.warmup_steps")
        if stage.rewarm_steps > stage.steps:  # the stage would end before its rate comes back
            raise RecipeError(f"stages.{i}.rewarm_steps: {stage.rewarm_steps} is longer than the stage's "
                              f"{stage.steps} steps")
        if i > 0 and stage.rewarm_steps > 0 and cfg.optim.warmup_steps > cfg.stages[0].steps:
            raise RecipeError(f"optim.warmup_steps: {cfg.optim.warmup_steps} runs past stage 0's {cfg.stages[0].steps} "
                              f"steps into a stage that re-warms (stages.{i}.rewarm_steps): the two ramps would multiply")
    if not 0 < cfg.model.min_depth < cfg.model.max_depth or not math.isfinite(cfg.model.max_depth):
        raise RecipeError(f"model.min_depth, model.max_depth: need 0 < min_depth < max_depth < inf, got "
                          f"{cfg.model.min_depth}, {cfg.model.max_depth}")
    for i, policy in enumerate(policies):
        far_target, mask = getattr(policy, "far_target", None), getattr(policy, "max_depth", None)
        if far_target is not None and mask is not None and far_target <= mask:
            raise RecipeError(f"stages.{i}.policy.far_target: {far_target:g} m lies within the policy's max_depth "
                              f"{mask:g} m: the sky would be taught inside the near range, a phantom by construction")
        # A target beyond the head's range is unreachable (a sigmoid x 80 head cannot put the sky
        # at 655 m): the loss would push the output into saturation and the sky stays a phantom.
        for name in ("far_target", "max_depth"):
            value = getattr(policy, name, None)
            if value is not None and value > cfg.model.max_depth:
                raise RecipeError(f"stages.{i}.policy.{name}: {value:g} m lies beyond the model's range "
                                  f"(model.max_depth {cfg.model.max_depth:g} m); raise model.max_depth "
                                  f"(model.head=log covers the unclipped range)")
    for key in ("train_shards", "val_shards"):
        if not str(cfg.data[key]).strip():
            raise RecipeError(f"data.{key}: empty; give a shard pattern such as data/train/*.tar")
    if cfg.init_from and cfg.resume:
        raise RecipeError("init_from and resume are exclusive: init_from starts a new stage, resume continues a run")


# Values a sign error would turn into something else without a word (a negative jitter or buffer
# reads as none, a negative loss weight switches the term off).
_NON_NEGATIVE = (
    ("optim", "warmup_steps"), ("optim", "weight_decay"), ("optim", "grad_clip"), ("optim", "poly_power"),
    ("loss", "silog_lambda"), ("loss", "grad_weight"), ("loss", "nll_weight"),
    ("data", "scale_jitter"), ("data", "color_jitter"), ("data", "shuffle_buffer"), ("data", "epoch_samples"),
    ("data", "max_bad_samples"), ("data", "val_max_images"), ("logging", "image_every_steps"),
)


def _check_finite(cfg: DictConfig) -> None:
    """No float of a recipe may be NaN or infinite: an infinite learning rate or a NaN decay power
    trains the weights into NaN without a non-finite loss or gradient to stop it first."""
    for section in ("data", "model", "loss", "optim", "trainer", "logging"):
        for key, value in cfg[section].items():
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{section}.{key}: must be a finite number, got {value}")


# W&B's own rule for project names (wandb_settings.validate_project), applied to the entity too:
# W&B checks it only when the run starts, after a replaced run's files are gone.
WANDB_NAME_FORBIDDEN = "/\\#?%:"


def _check_wandb_name(key: str, value: str, required: bool) -> None:
    if required and not value.strip():
        raise RecipeError(f"{key}: must not be empty")
    if value != value.strip():
        raise RecipeError(f"{key}: {value!r} has leading or trailing spaces")
    if len(value) > 128:
        raise RecipeError(f"{key}: {value!r} is longer than W&B's 128 characters")
    bad = sorted({c for c in value if c in WANDB_NAME_FORBIDDEN})
    if bad:
        raise RecipeError(f"{key}: {value!r} contains {' '.join(bad)}, which W&B names cannot hold "
                          f"({' '.join(WANDB_NAME_FORBIDDEN)})")


def _check_devices(devices: Any) -> None:
    """Lightning's forms: a count, "auto", -1 (all), or device indices (a list or "0,1")."""
    if isinstance(devices, bool):
        ok = False
    elif isinstance(devices, int):
        ok = devices >= 1 or devices == -1
    elif isinstance(devices, str):  # "2" is a count, "0,1" or "1," are indices
        compact = devices.replace(" ", "")
        ok = compact in ("auto", "-1") or (re.fullmatch(r"\d+(,\d+)*,?", compact) is not None and compact != "0")
    else:
        ok = OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) and d >= 0 for d in devices)
    if not ok:
        raise RecipeError(f"trainer.devices: {devices!r} is not a device count, 'auto', -1 or a list of indices")


def total_steps(cfg) -> int:
    """Steps over all stages, of a recipe as DictConfig or as plain containers."""
    return int(sum(int(stage["steps"]) for stage in cfg["stages"]))


def to_plain(cfg: DictConfig) -> dict:
    """The resolved recipe as plain containers (safe for weights_only checkpoint loading)."""
    return OmegaConf.to_container(cfg, resolve=True)
