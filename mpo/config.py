"""Recipes: YAML files parsed into typed, frozen-shape dataclasses.

``load_recipe("recipes/tiny_cpu.yaml", ["train.lr=1e-5", "loss.beta=0.2"])`` reads the file,
applies ``dotted.key=value`` overrides (values parsed as YAML), and builds :class:`Recipe`. A key
that no dataclass declares is an error listing the valid keys, so a typo never trains silently
with a default; a value of the wrong type is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mpo.errors import DataError

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class LoraConfig:
    """peft LoRA adapters; the reference is the same model with adapters disabled."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    vision: bool = False
    """Also put adapters on the vision tower's attention and MLP layers."""
    merge_on_save: bool = False
    """Also write a merged full model to ``output_dir/final/merged``."""
    merge_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the merged model. Merged into 16-bit weights, an update smaller than half a unit in
    the last place of its base weight rounds away (most of them at LoRA rates); float32 keeps the
    merged model equal to base + adapter, at twice the size of a bfloat16 one."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """A local HF directory or hub id of an InternVL ``-hf`` checkpoint."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """The dtype the weights are loaded in (mixed precision is ``train.mixed_precision``)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    """Only for checkpoints that need it; off unless asked."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ReferenceConfig:
    precomputed_path: str = ""
    """A file written by ``mpo precompute-ref``; when set, no reference model is loaded."""


@dataclass
class DataConfig:
    meta_path: str = ""
    """An MMPR ``meta.json``; exactly one of ``meta_path`` / ``jsonl_path`` is set."""
    jsonl_path: str = ""
    """A single annotation JSONL, its images under ``image_root``."""
    image_root: str = ""
    max_dynamic_patch: int = 6
    """Tile budget per sample unless its meta.json entry sets its own."""
    max_length: int = 8192
    """Longest prompt + response, in tokens (image tokens included)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Over-long pairs: cut the responses to fit, or drop the pair. Image tokens are never cut;
    a prompt that alone exceeds ``max_length`` is always dropped."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """Bad records: stop with an error, or skip them into ``output_dir/skipped.jsonl``."""
    video_frames: int = 8
    num_workers: int = 0
    shuffle: bool = True


@dataclass
class LossConfig:
    beta: float = 0.1
    dpo_weight: float = 0.8
    bco_weight: float = 0.2
    sft_weight: float = 1.0
    sft_reduction: Literal["sequence", "token"] = "sequence"
    """``sequence``: the paper's per-response mean; ``token``: the peers' micro-batch token mean."""
    delta_mode: Literal["cumulative", "ema"] = "cumulative"
    delta_ema_decay: float = 0.99


@dataclass
class ForwardConfig:
    layout: Literal["plain", "shared_prefix", "packed"] = "plain"
    """``plain``: a chosen and a rejected row per pair (the peers' way); ``shared_prefix``:
    ``[prompt | chosen | rejected]`` in one row; ``packed``: several such pairs per row."""
    dedupe_vision: bool = True
    """Run the vision tower once per pair instead of once per row, and let the reference reuse
    the policy's image features when the vision tower and projector are frozen."""
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    """``auto``: FlexAttention on CUDA, per-pair SDPA elsewhere; ``sdpa`` / ``flex`` force one."""
    pack_length: int = 0
    """Row length for ``packed`` (0: ``data.max_length``)."""


@dataclass
class TrainConfig:
    lr: float = 1e-6
    vision_lr: float = 0.0
    """Peak rate of the vision tower (0: ``lr``); a from-scratch or newly unfrozen encoder often
    wants a higher one than the language model."""
    projector_lr: float = 0.0
    """Peak rate of the multimodal projector (0: ``lr``)."""
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_ratio: float = 0.05
    lr_scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    micro_batch_size: int = 1
    """Pairs per forward pass on each process."""
    gradient_accumulation_steps: int = 1
    max_steps: int = 0
    """Optimizer steps; 0 means ``num_epochs`` passes over the data."""
    num_epochs: float = 1.0
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: int = 1
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Resumable checkpoints kept on disk."""


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "outputs/run"
    seed: int = 42
    report_to: Literal["none", "wandb"] = "none"
    wandb_project: str = "mpo"
    wandb_run_name: str = ""
    resume_from: str = ""
    """A checkpoint directory, or ``latest`` for the newest one in ``output_dir``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Checks (and where lossless, converts) one value against a field's annotation."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise DataError(f"expected a mapping, got {value!r}", field=key)
        return _build(annotation, value, key + ".")
    if origin is Literal:
        if value is False and "no" in typing.get_args(annotation):
            value = "no"  # YAML 1.1 reads a bare `no` (train.mixed_precision=no) as false
        if value not in typing.get_args(annotation):
            raise DataError(f"must be one of {list(typing.get_args(annotation))}, got {value!r}", field=key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise DataError(f"expected a list, got {value!r}", field=key)
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key)
            except DataError:
                continue
        raise DataError(f"cannot be {value!r}", field=key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise DataError(f"expected true or false, got {value!r}", field=key)
        return value
    if annotation is float:
        # PyYAML follows YAML 1.1, which reads 1e-5 (no dot) as a string; take it as the number.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"expected a number, got {value!r}", field=key)
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"expected an integer, got {value!r}", field=key)
        return value
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise DataError(f"expected a string, got {value!r}", field=key)
        return str(value)
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise DataError(f"unknown key {prefix}{unknown[0]!s}; valid keys here: {', '.join(prefix + n for n in names)}")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in data.items()})


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DataError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def recipe_from_dict(data: dict, overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
    data = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise DataError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    try:
        recipe = _build(Recipe, data)
    except DataError as error:
        raise DataError(str(error), file=source) from None
    _validate(recipe, source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads a YAML recipe and applies ``dotted.key=value`` overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise DataError("recipe not found", file=str(path)) from None
    except yaml.YAMLError as error:
        raise DataError(f"invalid YAML: {error}".replace("\n", " "), file=str(path)) from None
    if not isinstance(data, dict):
        raise DataError("a recipe is a mapping of sections", file=str(path))
    return recipe_from_dict(data, overrides, str(path))


def _validate(recipe: Recipe, source: str) -> None:
    """Cross-field rules a dataclass cannot express."""
    data, train = recipe.data, recipe.train
    if bool(data.meta_path) == bool(data.jsonl_path):
        raise DataError("set exactly one of data.meta_path and data.jsonl_path", file=source)
    if not recipe.model.name_or_path:
        raise DataError("model.name_or_path is required", file=source)
    for name in ("micro_batch_size", "gradient_accumulation_steps"):
        if getattr(train, name) < 1:
            raise DataError("must be at least 1", file=source, field=f"train.{name}")
    if train.max_steps < 0 or train.num_epochs <= 0 and train.max_steps == 0:
        raise DataError("set train.max_steps > 0 or train.num_epochs > 0", file=source)
    if min(recipe.loss.dpo_weight, recipe.loss.bco_weight, recipe.loss.sft_weight) < 0:
        raise DataError("loss weights must be >= 0", file=source)
    if recipe.loss.dpo_weight == recipe.loss.bco_weight == recipe.loss.sft_weight == 0:
        raise DataError("every loss weight is 0: nothing to train", file=source)
