"""Recipes: YAML files parsed into typed, frozen-shape dataclasses.

``load_recipe("recipes/tiny_cpu.yaml", ["train.lr=1e-5", "loss.beta=0.2"])`` reads the file,
applies ``dotted.key=value`` overrides (values parsed as YAML), and builds :class:`Recipe`. A key
that no dataclass declares is an error listing the valid keys, so a typo never trains silently
with a default; a value of the wrong type is an error naming the key.

The docstring under each field is its documentation: :func:`mpo.config_keys.recipe_keys` reads
them from this file's source, and ``mpo train --help`` lists every key with its type, default and
that text.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mpo.config_parsing import build, set_dotted
from mpo.config_ranges import check_ranges
from mpo.errors import DataError


# accelerate's trackers (``accelerate.utils.LoggerType`` less "all"), as HF Trainer's report_to.
Tracker = Literal["wandb", "tensorboard", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]

MAX_IMAGE_PIXELS = 89_478_485
"""The default pixel limit per image: Pillow's own decompression-bomb threshold (about 9459 x 9459)."""


@dataclass
class LoraConfig:
    """peft LoRA adapters; the reference is the same model with adapters disabled."""

    enabled: bool = False
    """Train LoRA adapters instead of the full model."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Language-model linear layers that get adapters (peft names)."""
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
    """The transformers attention kernel of the model's layers."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed."""
    freeze_projector: bool = False
    """Keep the multimodal projector (MLP) fixed."""
    freeze_language: bool = False
    """Keep the language model fixed."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    trust_remote_code: bool = False
    """Only for checkpoints that need it; off unless asked."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (``model.lora.*``)."""


@dataclass
class ReferenceConfig:
    name_or_path: str = ""
    """The frozen reference's checkpoint (empty: the starting model), with the policy's ``model.*`` settings and
    vocabulary (``mpo iterate``'s ``reference: initial``). Not with LoRA: its reference is the adapters off."""
    precomputed_path: str = ""
    """A file written by ``mpo precompute-ref``; when set, no reference model is loaded."""
    image_fingerprint: Literal["stat", "content"] = "stat"
    """How the precomputed file identifies the images and videos it was computed on: ``stat``
    (size and modification time of each file: one ``stat`` per file, but an image replaced by one
    of the same size with its old time kept, e.g. ``cp -p``, goes unnoticed) or ``content`` (a
    hash of every byte: certain, but it reads the whole dataset at every start)."""


@dataclass
class DataConfig:
    meta_path: str = ""
    """An MMPR ``meta.json``; exactly one of ``meta_path`` / ``jsonl_path`` / ``dataset_path`` is set."""
    data_root: str = ""
    """The directory meta.json's relative ``root``/``annotation`` paths start from. Empty: the
    folder of meta.json, else its parent (the released MMPR-v1.2 writes them relative to the
    folder above it, e.g. ``MMPR-v1.2/annotations/...``)."""
    jsonl_path: str = ""
    """A single annotation JSONL, its images under ``image_root``."""
    dataset_path: str = ""
    """Preference rows of TRL (prompt, chosen, rejected, images), ms-swift (messages,
    rejected_response, images) or LLaMA-Factory (conversations, chosen, rejected, images), the
    format read from the columns: a JSONL, JSON, parquet or arrow file, a ``save_to_disk``
    directory, or a directory of such files."""
    dataset_split: str = "train"
    """The split of a ``save_to_disk`` DatasetDict that ``dataset_path`` names."""
    image_root: str = ""
    """Where relative image paths point (default: the JSONL's or the dataset's directory)."""
    max_dynamic_patch: int = 6
    """Tile budget per sample unless its meta.json entry sets its own (``mpo-data`` writes the
    budget it sampled with there)."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Largest image accepted, in pixels (width x height); a larger one is a bad record (an error,
    or skipped), found from its header before any pixel is decoded."""
    validate: bool = False
    """Before training, check every image and video header the run will use (what ``mpo validate``
    does), instead of finding a bad file when its batch comes up."""
    max_length: int = 8192
    """Longest prompt + response, in tokens (image tokens included)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Over-long pairs: cut the responses to fit, or drop the pair. Image tokens are never cut;
    a prompt that alone exceeds ``max_length`` is always dropped."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """Bad records: stop with an error, or skip them into ``output_dir/skipped.jsonl``."""
    system_prompt: str = ""
    """The system message: empty (default) takes the one each ``meta.json`` subset records (what
    ``mpo-data`` sampled its responses with), and ``auto`` for a subset that records none (e.g.
    MMPR-v1.2) or a ``jsonl_path``; ``auto`` is InternVL2.5/3's default message (the one the
    checkpoints were trained with), ``none`` no system turn, any other text that message. A value
    set here overrides ``meta.json``, and each subset it changes is reported."""
    video_frames: int = 8
    """Frames sampled per video (the middles of equal segments), one tile each."""
    num_workers: int = 0
    """DataLoader workers that decode and tile images in the background (0: in the training loop)."""
    shuffle: bool = True
    """Shuffle pairs each epoch (seeded); false keeps file order."""
    eval_meta_path: str = ""
    """An MMPR ``meta.json`` of held-out pairs to evaluate on (see ``train.eval_every``); at most
    one of ``eval_meta_path``, ``eval_jsonl_path`` and ``eval_fraction`` is set."""
    eval_jsonl_path: str = ""
    """A single held-out annotation JSONL, its images under ``eval_image_root``."""
    eval_image_root: str = ""
    """The images of ``eval_jsonl_path`` (default: its directory)."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the training questions for evaluation instead (seeded by
    ``seed``; every pair of a question, same prompt and images, lands on the same side)."""


@dataclass
class LossConfig:
    beta: float = 0.1
    """Scale of the implicit reward r = beta * (log pi - log pi_ref)."""
    dpo_weight: float = 0.8
    """Weight of the DPO preference term (0 removes it)."""
    bco_weight: float = 0.2
    """Weight of the BCO quality term with the reward shift delta (0 removes it)."""
    sft_weight: float = 1.0
    """Weight of the SFT generation term on the chosen response (0 removes it)."""
    sft_reduction: Literal["sequence", "token"] = "sequence"
    """``sequence``: the paper's per-response mean; ``token``: the peers' micro-batch token mean."""
    delta_mode: Literal["cumulative", "ema"] = "cumulative"
    """The reward shift delta: the paper's cumulative mean of past steps' rewards, or an EMA."""
    delta_ema_decay: float = 0.99
    """Decay of the ``ema`` delta."""


@dataclass
class ForwardConfig:
    layout: Literal["auto", "plain", "shared_prefix", "packed"] = "auto"
    """``plain``: a chosen and a rejected row per pair (the peers' way); ``shared_prefix``:
    ``[prompt | chosen | rejected]`` in one row; ``packed``: several such pairs per row; ``auto``:
    per micro-batch, ``packed`` where it feeds fewer token slots than ``shared_prefix`` (pairs of
    unequal length that share a row), else ``shared_prefix``. Every layout gives the plain
    layout's log-probs (within 1e-5 per token in float32)."""
    dedupe_vision: bool = True
    """Run the vision tower once per pair instead of once per row, and let the reference reuse
    the policy's image features when the vision tower and projector are frozen."""
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    """``auto``: FlexAttention on CUDA, per-pair SDPA elsewhere; ``sdpa`` / ``flex`` force one."""
    pack_length: int = 0
    """Row length for ``packed`` and ``auto`` (0: ``data.max_length``)."""


@dataclass
class TrainConfig:
    lr: float = 1e-6
    """Peak learning rate (of the language model; see ``vision_lr`` / ``projector_lr``)."""
    vision_lr: float = 0.0
    """Peak rate of the vision tower (0: ``lr``); a from-scratch or newly unfrozen encoder often
    wants a higher one than the language model."""
    projector_lr: float = 0.0
    """Peak rate of the multimodal projector (0: ``lr``)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    warmup_ratio: float = 0.05
    """Share of the steps over which the rate rises linearly from 0."""
    lr_scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    """The rate's shape after warm-up."""
    micro_batch_size: int = 1
    """Pairs per forward pass on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size x this x processes."""
    max_steps: int = 0
    """Optimizer steps; 0 means ``num_epochs`` passes over the data."""
    num_epochs: float = 1.0
    """Passes over the data when ``max_steps`` is 0 (fractions allowed)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 or less: no clipping (the norm is still computed and logged), as
    HF Trainer, TRL and DeepSpeed read it, the same under one process, DDP and DeepSpeed."""
    grad_accum_dtype: Literal["weights", "fp32"] = "weights"
    """Where 16-bit weights' gradients are summed over the micro-batches of a step (and, under DDP,
    all-reduced): ``weights`` in the weights' own dtype, as DeepSpeed, HF Trainer and TRL do,
    rounding the running sum at every micro-batch; ``fp32`` in an fp32 buffer per trainable weight,
    exact to fp32 rounding, for +4 bytes per trainable parameter held through the whole step (32 GB
    for a fully trained 8B model without sharding; under DeepSpeed its
    ``data_types.grad_accum_dtype``). ``mpo grad-accum`` measures both; figures and the choice of
    default: the README's Precision section. No effect on float32 weights."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """Autocast precision of the forward passes; ``no`` computes in ``model.dtype``."""
    log_every: int = 1
    """Write metrics every N steps (and at the last one)."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Resumable checkpoints kept on disk."""
    eval_every: int = 0
    """Evaluate on the held-out pairs (``data.eval_*``) every N steps and after the last one (0:
    after the last one only)."""
    save_best: str = ""
    """Keep ``output_dir/best``, a loadable copy of the model at the best value so far of this
    eval metric (e.g. ``eval/loss``); empty: off."""
    save_best_mode: Literal["auto", "min", "max"] = "auto"
    """Whether a lower or a higher ``save_best`` value is better. ``auto`` follows the metric:
    lower for the losses and for the rejected responses' rewards and log-probs, higher for the
    chosen responses' rewards and log-probs, the margins and the accuracies."""
    collective_timeout: float = 300.0
    """Seconds a process may stop answering (frozen, stopped with SIGSTOP, its machine unreachable)
    before the run ends with one line naming it; collectives themselves (gloo, NCCL, DeepSpeed)
    time out at twice this, which must exceed the longest wait for process 0 (a checkpoint save)."""


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy checkpoint (``model.*``)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The reference model (``reference.*``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The preference pairs (``data.*``)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The MPO objective (``loss.*``)."""
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    """How pairs are laid out for the forward passes (``forward.*``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation (``train.*``)."""
    output_dir: str = "outputs/run"
    """Checkpoints, the final model, metrics.jsonl, skipped.jsonl and tracker files go here."""
    seed: int = 42
    """Seeds the pair order, the ``repeat_time`` samples and every RNG."""
    report_to: list[Tracker] = field(default_factory=list, metadata={"one_or_many": True})
    """Experiment trackers (accelerate's) besides metrics.jsonl: a list (``[wandb, tensorboard]`` or
    ``wandb,tensorboard``), one name, or ``none``."""
    project: str = "mpo"
    """The trackers' project (W&B project, MLflow experiment, tensorboard sub-directory)."""
    run_name: str = ""
    """The W&B run name (empty: W&B picks one)."""
    resume_from: str = ""
    """A checkpoint directory, or ``latest`` for the newest one in ``output_dir``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The whole recipe, overrides applied; :func:`load_recipe` reads it back to an equal one."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def has_eval_data(self) -> bool:
        """Whether the recipe names held-out pairs to evaluate on."""
        data = self.data
        return bool(data.eval_meta_path or data.eval_jsonl_path or data.eval_fraction)


def eval_metric_names(loss: LossConfig) -> list[str]:
    """The metrics an evaluation logs under these loss weights (a zero-weight term has none)."""
    terms = [name for name, weight in (("dpo", loss.dpo_weight), ("bco", loss.bco_weight), ("sft", loss.sft_weight)) if weight]
    rewards = ["chosen", "rejected", "margins", "accuracies"] if loss.dpo_weight or loss.bco_weight else []
    return ["eval/loss", *(f"eval/loss/{t}" for t in terms), *(f"eval/rewards/{r}" for r in rewards),
            "eval/logps/chosen", "eval/logps/rejected"]


def save_best_direction(train: TrainConfig) -> Literal["min", "max"]:
    """``train.save_best_mode`` resolved: ``auto`` follows ``train.save_best`` (its docstring)."""
    if train.save_best_mode != "auto":
        return train.save_best_mode
    name = train.save_best.removeprefix("eval/")
    return "min" if name.startswith("loss") or name.endswith("/rejected") else "max"


def section_from_dict(cls: type, data: dict, prefix: str, source: str) -> Any:
    """A section declared like a recipe's (documented dataclass fields), its keys and types checked as a recipe's."""
    try:
        return build(cls, data, prefix)
    except DataError as error:
        raise DataError(str(error), file=source) from None


def with_overrides(data: dict, overrides: list[str] | None) -> dict:
    """A copy of ``data`` with ``dotted.key=value`` overrides applied (values parsed as YAML)."""
    data = copy.deepcopy(data or {})  # overrides must not change the caller's dict
    for item in overrides or []:
        if "=" not in item:
            raise DataError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return data


def recipe_from_dict(data: dict, overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
    recipe = section_from_dict(Recipe, with_overrides(data, overrides), "", source)
    _validate(recipe, source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads a YAML recipe and applies ``dotted.key=value`` overrides."""
    return recipe_from_dict(read_recipe_yaml(path), overrides, str(path))


def read_recipe_yaml(path: str | Path) -> dict:
    """The mapping of a recipe file; a missing file or bad YAML is a one-line error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise DataError("recipe not found", file=str(path)) from None
    except yaml.YAMLError as error:
        raise DataError(f"invalid YAML: {error}".replace("\n", " "), file=str(path)) from None
    if not isinstance(data, dict):
        raise DataError("a recipe is a mapping of sections", file=str(path))
    return data


def _validate(recipe: Recipe, source: str) -> None:
    """Cross-field rules a dataclass cannot express."""
    data, train = recipe.data, recipe.train
    if [bool(data.meta_path), bool(data.jsonl_path), bool(data.dataset_path)].count(True) != 1:
        raise DataError("set exactly one of data.meta_path, data.jsonl_path and data.dataset_path", file=source)
    if not recipe.model.name_or_path:
        raise DataError("model.name_or_path is required", file=source)
    for name in ("micro_batch_size", "gradient_accumulation_steps"):
        if getattr(train, name) < 1:
            raise DataError("must be at least 1", file=source, field=f"train.{name}")
    for name in ("max_dynamic_patch", "max_length", "max_image_pixels", "video_frames"):
        if getattr(data, name) < 1:
            raise DataError(f"must be at least 1, got {getattr(data, name)}", file=source, field=f"data.{name}")
    if train.max_steps < 0 or train.num_epochs <= 0 and train.max_steps == 0:
        raise DataError("set train.max_steps > 0 or train.num_epochs > 0", file=source)
    if train.collective_timeout <= 0:
        raise DataError(f"must be > 0 seconds, got {train.collective_timeout}", file=source, field="train.collective_timeout")
    check_ranges(recipe, source)
    if recipe.loss.dpo_weight == recipe.loss.bco_weight == recipe.loss.sft_weight == 0:
        raise DataError("every loss weight is 0: nothing to train", file=source)
    if recipe.reference.name_or_path and recipe.model.lora.enabled:
        raise DataError("a LoRA run's reference is its base model with the adapters off; unset reference.name_or_path "
                        "or model.lora.enabled", file=source, field="reference.name_or_path")
    _validate_eval(recipe, source)


def _validate_eval(recipe: Recipe, source: str) -> None:
    data, train = recipe.data, recipe.train
    if sum(map(bool, (data.eval_meta_path, data.eval_jsonl_path, data.eval_fraction))) > 1:
        raise DataError("set at most one of data.eval_meta_path, data.eval_jsonl_path and data.eval_fraction", file=source)
    if not 0 <= data.eval_fraction < 1:
        raise DataError(f"must be in [0, 1), got {data.eval_fraction}", file=source, field="data.eval_fraction")
    if train.eval_every < 0:
        raise DataError("must be >= 0", file=source, field="train.eval_every")
    if (train.eval_every or train.save_best) and not recipe.has_eval_data:
        field = "train.eval_every" if train.eval_every else "train.save_best"
        raise DataError("needs held-out pairs: set data.eval_meta_path, data.eval_jsonl_path or data.eval_fraction",
                        file=source, field=field)
    names = eval_metric_names(recipe.loss)
    if train.save_best and train.save_best not in names:
        raise DataError(f"unknown eval metric {train.save_best!r}; choose from {', '.join(names)}", file=source, field="train.save_best")
    if recipe.reference.precomputed_path and (data.eval_meta_path or data.eval_jsonl_path):
        # The stored log-probs cover the training data only; a held-out fraction of it is covered.
        field = "data.eval_meta_path" if data.eval_meta_path else "data.eval_jsonl_path"
        raise DataError("a precomputed reference holds no log-probs of other data: evaluate on data.eval_fraction, "
                        "or unset reference.precomputed_path", file=source, field=field)
