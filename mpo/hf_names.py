"""The argument spellings users bring from HF Trainer, TRL, ms-swift, LLaMA-Factory and InternVL's
scripts, each answered with the recipe key (or flag) that does the same here.

:func:`mpo.config.recipe_from_dict` answers an unknown key with its spelling here ("did you mean
``train.lr``?" for ``learning_rate``), ``mpo train`` an unknown ``--flag`` likewise, and the
README's table of spellings is :func:`spelling_table` (a test keeps them equal).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Spelling:
    """One argument as a peer spells it, and what it is here."""

    name: str
    """The peer's argument name (``learning_rate``)."""
    peers: str
    """Whose spelling it is."""
    key: str
    """The recipe key (``train.lr``), or what to do instead."""
    note: str = ""
    """How the value differs, when it does."""


HF = "HF Trainer, TRL"
SPELLINGS = [
    Spelling("model_name_or_path", "TRL scripts, InternVL", "model.name_or_path"),
    Spelling("torch_dtype", HF, "model.dtype"),
    Spelling("attn_implementation", HF, "model.attn_implementation"),
    Spelling("gradient_checkpointing", HF, "model.gradient_checkpointing"),
    Spelling("learning_rate", HF, "train.lr"),
    Spelling("per_device_train_batch_size", HF, "train.micro_batch_size", "pairs per forward pass per process"),
    Spelling("gradient_accumulation_steps", HF, "train.gradient_accumulation_steps"),
    Spelling("num_train_epochs", HF, "train.num_epochs"),
    Spelling("max_steps", HF, "train.max_steps", "HF's -1 (no step limit) is 0 here, the default: train.num_epochs decides"),
    Spelling("warmup_ratio", HF, "train.warmup_ratio"),
    Spelling("lr_scheduler_type", HF, "train.lr_scheduler", "cosine, constant or linear"),
    Spelling("weight_decay", HF, "train.weight_decay"),
    Spelling("adam_beta1", HF, "train.adam_beta1"),
    Spelling("adam_beta2", HF, "train.adam_beta2"),
    Spelling("max_grad_norm", HF, "train.max_grad_norm"),
    Spelling("bf16", HF, "train.mixed_precision", "bf16: true is train.mixed_precision: bf16"),
    Spelling("fp16", HF, "train.mixed_precision", "fp16: true is train.mixed_precision: fp16"),
    Spelling("logging_steps", HF, "train.log_every"),
    Spelling("save_steps", HF, "train.save_every"),
    Spelling("save_total_limit", HF, "train.keep_last"),
    Spelling("eval_steps", HF, "train.eval_every"),
    Spelling("metric_for_best_model", HF, "train.save_best", "with its eval/ prefix: eval/loss"),
    Spelling("greater_is_better", HF, "train.save_best_mode", "true is max"),
    Spelling("dataloader_num_workers", HF, "data.num_workers"),
    Spelling("output_dir", HF, "output_dir"),
    Spelling("report_to", HF, "report_to", "a list, one name or none, e.g. report_to=wandb,tensorboard"),
    Spelling("run_name", HF, "run_name"),
    Spelling("seed", HF, "seed"),
    Spelling("resume_from_checkpoint", HF, "resume_from", "a checkpoint directory or latest"),
    Spelling("beta", "TRL", "loss.beta"),
    Spelling("loss_type", "TRL", "loss.dpo_weight, loss.bco_weight, loss.sft_weight",
             "MPO is TRL's loss_type [sigmoid, bco_pair, sft] with loss_weights [0.8, 0.2, 1.0]: a weight per term"),
    Spelling("loss_weights", "TRL", "loss.dpo_weight, loss.bco_weight, loss.sft_weight"),
    Spelling("rpo_alpha", "TRL", "loss.sft_weight", "the SFT term's weight (the official MPO code sets it through rpo_alpha)"),
    Spelling("max_length", "TRL", "data.max_length", "prompt and responses, image tokens included; image tokens are never cut"),
    Spelling("max_prompt_length", "TRL", "data.max_length",
             "no separate prompt limit: a prompt is never cut, an over-long one is dropped"),
    Spelling("max_completion_length", "TRL", "data.max_length"),
    Spelling("truncation_mode", "TRL", "data.overlong", "truncate (responses only) or drop"),
    Spelling("precompute_ref_log_probs", "TRL", "reference.precomputed_path", "run mpo precompute-ref RECIPE, then set the path"),
    Spelling("use_peft", "TRL scripts", "model.lora.enabled"),
    Spelling("lora_r", "TRL scripts", "model.lora.r"),
    Spelling("lora_rank", "ms-swift, LLaMA-Factory", "model.lora.r"),
    Spelling("lora_alpha", "TRL scripts, ms-swift, LLaMA-Factory", "model.lora.alpha"),
    Spelling("lora_dropout", "TRL scripts, ms-swift, LLaMA-Factory", "model.lora.dropout"),
    Spelling("lora_target_modules", "TRL scripts", "model.lora.target_modules"),
    Spelling("pref_beta", "LLaMA-Factory", "loss.beta"),
    Spelling("pref_ftx", "LLaMA-Factory", "loss.sft_weight"),
    Spelling("cutoff_len", "LLaMA-Factory", "data.max_length"),
    Spelling("freeze_vision_tower", "LLaMA-Factory", "model.freeze_vision"),
    Spelling("freeze_multi_modal_projector", "LLaMA-Factory", "model.freeze_projector"),
    Spelling("freeze_vit", "ms-swift", "model.freeze_vision"),
    Spelling("freeze_aligner", "ms-swift", "model.freeze_projector"),
    Spelling("freeze_llm", "ms-swift, InternVL", "model.freeze_language"),
    Spelling("freeze_backbone", "InternVL", "model.freeze_vision"),
    Spelling("freeze_mlp", "InternVL", "model.freeze_projector"),
    Spelling("max_dynamic_patch", "InternVL", "data.max_dynamic_patch"),
    Spelling("dataset", "ms-swift, LLaMA-Factory", "data.dataset_path", "a local file or folder of their preference rows"),
    Spelling("dataset_name", "TRL scripts", "data.dataset_path",
             "a local dataset (save_to_disk, parquet, JSONL); no hub download"),
    Spelling("system", "ms-swift", "data.system_prompt"),
    Spelling("deepspeed", HF, "mpo train --launch launch/zero1.yaml", "one of launch/*.yaml"),
]
_BY_NAME = {spelling.name: spelling for spelling in SPELLINGS}


def spelling_of(name: str) -> Spelling | None:
    """The peer spelling ``name`` (dashes read as underscores), or None."""
    return _BY_NAME.get(name.replace("-", "_").lower())


def suggestion(dotted: str, valid: list[str]) -> str | None:
    """What an unknown recipe key ``dotted`` most likely means: the peer spelling's key, else a
    recipe key spelled nearly alike (``train.lr_schedular``), else None."""
    spelling = spelling_of(dotted.rsplit(".", 1)[-1])
    if spelling is not None:
        note = f"; {spelling.note}" if spelling.note else ""
        return f"did you mean {spelling.key}? ({spelling.name} in {spelling.peers}{note})"
    close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.8)
    return f"did you mean {close[0]}?" if close else None


def value_hint(key: str, value) -> str | None:
    """A peer's special value that means something else here, explained; None for any other value."""
    if key == "train.max_steps" and value == -1:
        return ("-1 is HF's 'no step limit' (num_train_epochs decides); here that is train.max_steps: 0, the default, "
                "with train.num_epochs")
    if key == "report_to" and value in ("all", ["all"]):
        return ("HF's 'all' (every installed tracker) is not read here: list them, e.g. report_to=wandb,tensorboard "
                "or report_to=[wandb, tensorboard]")
    return None


def flag_hint(option: str, known: list[str], value: str | None = None) -> str:
    """What to say about an unknown command-line option (``--learning_rate``, ``--num_processes``).

    Args:
        option: the option as typed, perhaps with ``=VALUE``.
        known: the command's own option strings.
        value: the argument typed after the option, if any.
    """
    name, _, attached = option.partition("=")
    value = attached or value
    dashed = "--" + name.lstrip("-").replace("_", "-")
    if dashed in known:
        return f"unrecognized argument {name}: did you mean {dashed}? (this command's flags are spelled with dashes)"
    spelling = spelling_of(name.lstrip("-"))
    if spelling is None:
        return f"unrecognized argument {name}"
    if spelling.key.startswith("mpo "):
        return f"unrecognized argument {name}: use {spelling.key} ({spelling.note})"
    key = spelling.key.split(",")[0]
    return (f"unrecognized argument {name}: recipe keys follow the recipe as key=value: {key}={value or 'VALUE'} "
            f"({spelling.name} in {spelling.peers})")


def spelling_table() -> str:
    """The spellings as the README's Markdown table."""
    lines = ["| you may know | from | here | note |", "|---|---|---|---|"]
    lines += [f"| `{s.name}` | {s.peers} | `{s.key}` | {s.note} |".replace(" |  |", " | |") for s in SPELLINGS]
    return "\n".join(lines)
