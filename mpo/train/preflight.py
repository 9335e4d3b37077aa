"""Checks of a recipe against its data and this machine that need no model: run before any loads.

A model takes minutes to load at 8B; a recipe whose global batch the data cannot fill, a tracker
that is not installed or a checkpoint that is not there should fail in seconds, in one line that
names the keys to change.
"""

from __future__ import annotations

from pathlib import Path

from mpo.train.checkpoint import resolve_resume
from mpo.config import Recipe
from mpo.errors import DataError
from mpo.data.batch_order import GlobalBatchOrder


def check_global_batch(order: GlobalBatchOrder) -> None:
    """The data must fill one global batch (a partial last batch is left out each epoch)."""
    if order.steps_per_epoch == 0:
        raise DataError(
            f"{order.num_records} pairs cannot fill one global batch of {order.global_batch_size} "
            f"(micro_batch_size {order.micro_batch_size} x gradient_accumulation_steps {order.accumulation_steps} "
            f"x {order.world_size} process(es)); lower one of them or use fewer processes",
            field="train.micro_batch_size, train.gradient_accumulation_steps",
        )


def check_trackers(report_to: list[str]) -> None:
    """Every tracker of ``report_to`` is installed (accelerate would drop a missing one silently)."""
    from accelerate.tracking import get_available_trackers

    available = {str(tracker) for tracker in get_available_trackers()}
    for name in report_to:
        if name not in available:
            raise DataError(f"{name} is not installed (pip install {name}), or remove it from the list", field="report_to")


def check_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); a missing one is an error now."""
    try:
        return resolve_resume(recipe.resume_from, recipe.output_dir)
    except FileNotFoundError:
        raise DataError(f"{recipe.resume_from} is not a complete checkpoint (no trainer_state.json); "
                        "use a checkpoints/step-N directory or latest", field="resume_from") from None


def check_reference_vocabulary(recipe: Recipe, tokenizer) -> None:
    """A reference from another checkpoint (``reference.name_or_path``) must read the same token
    ids as the policy: with another vocabulary its log-probs would score other words."""
    from mpo.model.loading import load_processor, reference_model

    reference = load_processor(reference_model(recipe)).tokenizer
    if reference.get_vocab() != tokenizer.get_vocab():
        raise DataError(f"{recipe.reference.name_or_path} has another vocabulary than {recipe.model.name_or_path} "
                        f"({len(reference)} and {len(tokenizer)} tokens, or the same ids for other tokens); "
                        "the reference must share the policy's tokenizer", field="reference.name_or_path")


def check_before_loading(recipe: Recipe, order: GlobalBatchOrder) -> Path | None:
    """All the checks above; returns the checkpoint to resume from."""
    check_global_batch(order)
    check_trackers(recipe.report_to)
    return check_resume(recipe)
