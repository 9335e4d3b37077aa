"""The MPO training recipe: a plain accelerate loop, no HF Trainer.

Launch (one process, DDP or DeepSpeed, CPU or GPU alike)::

    accelerate launch [--config_file launch/zero2.yaml] -m mpo.train recipes/tiny_cpu.yaml [key.sub=value ...]

How it departs from the official InternVL/TRL MPO trainer:
1. The reward shift delta is a running mean over optimizer steps (not micro-batches), used one step
   late, saved in checkpoints, and never moved by evaluation (see :class:`mpo.losses.RewardShift`).
2. The SFT term defaults to the paper's per-response normalisation (``loss.sft_reduction``).
3. The vision tower runs once per pair, and the reference reuses the policy's image features
   when the vision tower and projector are frozen (``forward.dedupe_vision``).
4. The order of pairs is a pure function of (seed, step), so a resumed run sees exactly the pairs
   an uninterrupted one would, whatever the number of processes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from tqdm import tqdm
from transformers import get_scheduler

from mpo.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from mpo.collate import build_collator
from mpo.config import Recipe, load_recipe
from mpo.data import PreferenceDataset, append_skipped, load_records
from mpo.errors import DataError, OverlongPair
from mpo.forward import PreferenceForward
from mpo.losses import MPOLoss, RewardShift
from mpo.metrics import MetricsWriter, StepStats
from mpo.modeling import count_parameters, load_policy, load_processor, load_reference, vision_is_frozen
from mpo.precision import MasterWeightAdamW, check_precision, clip_grad_norm
from mpo.reference import DisabledAdapterReference, FrozenModelReference
from mpo.sampling import GlobalBatchOrder
from mpo.saving import save_final_model
from mpo.types import EncodedPair


def make_accelerator(recipe: Recipe) -> Accelerator:
    handlers = []
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi_process_cpu:
        # NCCL needs GPUs; on CPU, DDP and DeepSpeed run over gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    # A GPU launch config (launch/ddp.yaml) on a machine without GPUs makes accelerate start every
    # process as a lone trainer that never syncs; cpu=True makes it CPU data parallel instead. Not
    # under DeepSpeed: there cpu=True would switch DeepSpeed off.
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        kwargs_handlers=handlers,
        cpu=multi_process_cpu and not use_deepspeed,
        # The scheduler counts global optimizer steps (see train_step); accelerate's default would
        # step it once per process, decaying the rate N times too fast under N processes.
        step_scheduler_with_optimizer=False,
    )


def build_optimizer(model: torch.nn.Module, recipe: Recipe, master_weights: bool) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay, as in HF Trainer.

    The vision tower and the projector get their own peak rate when ``train.vision_lr`` /
    ``train.projector_lr`` are set; the scheduler scales every group by the same factor, and the
    language model's rate comes first, so ``get_last_lr()[0]`` is the logged ``lr``. With
    ``master_weights`` it steps fp32 copies of 16-bit weights (:mod:`mpo.precision`).
    """
    train = recipe.train
    rates = {"language": train.lr, "vision": train.vision_lr or train.lr, "projector": train.projector_lr or train.lr}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {(part, decay): [] for part in rates for decay in (True, False)}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            part = "vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name else "language"
            # A ZeRO-3 partitioned parameter is an empty 1-D placeholder; ds_shape is its real shape.
            ndim = len(parameter.ds_shape) if hasattr(parameter, "ds_shape") else parameter.ndim
            groups[part, ndim >= 2].append(parameter)
    optimizer_class = MasterWeightAdamW if master_weights else torch.optim.AdamW
    return optimizer_class(
        # DeepSpeed drops an empty group (LoRA trains no 1-D weights), leaving the scheduler with
        # more rates than groups; so no empty group is made.
        [{"params": params, "lr": rates[part], "weight_decay": train.weight_decay if decay else 0.0}
         for (part, decay), params in groups.items() if params],
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
    )


class PairFetcher:
    """Turns a micro-batch of dataset items into usable pairs.

    A bad pair (``DataError``) stops the run unless ``skip``; an over-long pair to drop
    (``OverlongPair``) is always skipped. A skipped pair is reported once (``skipped.jsonl`` and the
    console) and replaced by the next good pair, so every process keeps the same micro-batch size
    and no collective operation waits on a process with less work.
    """

    def __init__(self, dataset: PreferenceDataset, skip: bool, output_dir: str):
        self.dataset, self.skip, self.output_dir = dataset, skip, output_dir
        self.reported: set[str] = set()
        self.skipped_count = 0
        self.truncated_count = 0

    def resolve(self, items: list[EncodedPair | DataError], indices: list[int]) -> list[EncodedPair]:
        return [self._usable(item, index) for item, index in zip(items, indices)]

    def _usable(self, item: EncodedPair | DataError, index: int) -> EncodedPair:
        for offset in range(1, len(self.dataset) + 1):
            if isinstance(item, EncodedPair):
                self.truncated_count += item.truncated
                return item
            if not (self.skip or isinstance(item, OverlongPair)):
                raise item
            self._report(item)
            item = self.dataset[(index + offset) % len(self.dataset)]
        raise DataError("every pair of the dataset is unusable")

    def _report(self, error: DataError) -> None:
        if str(error) in self.reported:
            return
        self.reported.add(str(error))
        self.skipped_count += 1
        append_skipped(self.output_dir, [error])
        tqdm.write(f"skipped {error}")


class MicroBatchIndices:
    """The DataLoader batch sampler: this process's micro-batches from ``start`` to ``stop``."""

    def __init__(self, order: GlobalBatchOrder, start: int, stop: int, rank: int):
        self.order, self.start, self.stop, self.rank = order, start, stop, rank

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield from self.order.micro_batches(step, self.rank)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.order.accumulation_steps


def _as_list(items: list) -> list:
    return items


class MPOTrainer:
    """setup() in the constructor, then train(); one instance per process."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.accelerator = accelerator = make_accelerator(recipe)
        set_seed(recipe.seed)
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)

        self.processor = load_processor(recipe.model)
        skipped: list[DataError] | None = [] if recipe.data.on_bad_sample == "skip" else None
        records = load_records(recipe.data, recipe.seed, skipped)
        if skipped and accelerator.is_main_process:
            append_skipped(recipe.output_dir, skipped)
        self.dataset = PreferenceDataset(records, self.processor, recipe.data)
        self.fetch = PairFetcher(self.dataset, recipe.data.on_bad_sample == "skip", recipe.output_dir)
        self.fetch.skipped_count = len(skipped or [])
        self.collate = build_collator(recipe.forward, recipe.data, self.processor.tokenizer.pad_token_id)
        self.precomputed = None
        if recipe.reference.precomputed_path:
            from mpo.precompute import PrecomputedReference

            # Checked before any model loads, so a stale file is refused in seconds.
            self.precomputed = PrecomputedReference.open(recipe.reference.precomputed_path, recipe, self.dataset)
        self.order = GlobalBatchOrder(
            num_records=len(self.dataset),
            micro_batch_size=recipe.train.micro_batch_size,
            accumulation_steps=recipe.train.gradient_accumulation_steps,
            world_size=accelerator.num_processes,
            seed=recipe.seed,
            shuffle=recipe.data.shuffle,
        )
        train = recipe.train
        self.total_steps = train.max_steps or math.ceil(train.num_epochs * self.order.steps_per_epoch)
        if self.total_steps < 1:
            raise DataError(
                f"{len(self.dataset)} pairs cannot fill one global batch of {self.order.global_batch_size}",
                field="train.micro_batch_size",
            )

        self.loss_fn = MPOLoss(
            beta=recipe.loss.beta,
            dpo_weight=recipe.loss.dpo_weight,
            bco_weight=recipe.loss.bco_weight,
            sft_weight=recipe.loss.sft_weight,
            sft_reduction=recipe.loss.sft_reduction,
        )
        self.reward_shift = RewardShift(recipe.loss.delta_mode, recipe.loss.delta_ema_decay)

        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        check_precision(recipe.model.dtype, train.mixed_precision, deepspeed)
        if deepspeed:
            from mpo.distributed import check_supported, configure_deepspeed, text_hidden_size

            check_supported(accelerator, recipe.model)
            # No dataloader goes through prepare(): DeepSpeed learns batch, accumulation and
            # clipping here, before ZeRO-3 partitions the weights as they load.
            configure_deepspeed(
                accelerator,
                train.micro_batch_size,
                train.gradient_accumulation_steps,
                train.max_grad_norm,
                text_hidden_size(recipe.model),
            )
        policy_model = load_policy(recipe.model)
        self.trainable, self.total_params = count_parameters(policy_model)
        self.reuse_features = recipe.forward.dedupe_vision and vision_is_frozen(policy_model)
        policy = PreferenceForward(policy_model)
        if not deepspeed:
            policy.to(accelerator.device)  # fp32 masters are made where their weights live
        # DeepSpeed masters 16-bit weights itself; elsewhere the optimizer does.
        optimizer = build_optimizer(policy, recipe, master_weights=not deepspeed and recipe.model.dtype != "float32")
        scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer,
            num_warmup_steps=round(train.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.policy, self.optimizer, self.scheduler = accelerator.prepare(policy, optimizer, scheduler)
        self.reference = self._build_reference()

        self.step = 0
        resume = resolve_resume(recipe.resume_from, recipe.output_dir)
        if resume is not None:
            state = load_checkpoint(accelerator, resume)
            self.step = state["step"]
            self.reward_shift.load_state_dict(state["reward_shift"])
            self.fetch.skipped_count = state.get("skipped", self.fetch.skipped_count)
            self._print(f"resumed from {resume} at step {self.step}, delta {self.reward_shift.value:.6f}")
        self.metrics = None
        if accelerator.is_main_process:
            self.metrics = MetricsWriter(
                recipe.output_dir, recipe.to_dict(), recipe.report_to, self.step, recipe.wandb_project, recipe.wandb_run_name
            )

    def _build_reference(self):
        if not self.loss_fn.needs_reference:
            return None
        recipe = self.recipe
        if self.precomputed is not None:
            return self.precomputed
        if recipe.model.lora.enabled:
            return DisabledAdapterReference(self.accelerator.unwrap_model(self.policy), self.reuse_features)
        reference = PreferenceForward(load_reference(recipe.model))
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            from mpo.distributed import prepare_deepspeed_reference

            reference = prepare_deepspeed_reference(reference, self.accelerator)
        else:
            reference = reference.to(self.accelerator.device)
        return FrozenModelReference(reference, self.reuse_features)

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)

    def micro_batch_loader(self) -> DataLoader:
        """Pairs for the remaining steps, encoded (images decoded and tiled) in ``data.num_workers``
        background workers so the accelerator does not wait on JPEG decoding."""
        sampler = MicroBatchIndices(self.order, self.step, self.total_steps, self.accelerator.process_index)
        workers = self.recipe.data.num_workers
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=_as_list,
            num_workers=workers,
            prefetch_factor=2 if workers else None,
        )

    def train_step(self, micro_batches) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; returns the reduced metrics.

        Args:
            micro_batches: an iterator yielding ``(indices, items)`` for each micro-batch.
        """
        accelerator = self.accelerator
        stats = StepStats()
        delta = self.reward_shift.value
        lr = self.scheduler.get_last_lr()[0]  # the rate this step trains with
        grad_norm = None
        for _ in range(self.order.accumulation_steps):
            indices, items = next(micro_batches)
            batch = self.collate(self.fetch.resolve(items, indices)).to(accelerator.device)
            with accelerator.accumulate(self.policy):
                policy_out = self.policy(batch)
                reference_logps = None
                if self.reference is not None:
                    # The same autocast as the policy's forward, so that at step 1 (policy ==
                    # reference) every reward is exactly 0 in bf16 too.
                    with accelerator.autocast():
                        reference_logps = self.reference(batch, policy_out.image_features)
                output = self.loss_fn(policy_out.logps, reference_logps, delta)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients:
                    grad_norm = clip_grad_norm(accelerator, self.policy, self.optimizer, self.recipe.train.max_grad_norm)
                self.optimizer.step()
                if accelerator.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad()
            if output.chosen_rewards is not None:
                self.reward_shift.accumulate(output.chosen_rewards, output.rejected_rewards)
            stats.add(output, policy_out.logps, batch.num_tokens, batch.num_pairs)
        self.reward_shift.step(lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu())
        metrics = stats.reduce(accelerator)
        if grad_norm is None and accelerator.distributed_type == DistributedType.DEEPSPEED:
            grad_norm = self.policy.get_global_grad_norm()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["bco/delta"] = delta
        metrics["lr"] = lr
        return metrics

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "reward_shift": self.reward_shift.state_dict(),
            "skipped": self.fetch.skipped_count,
            "recipe": self.recipe.to_dict(),
        }

    def train(self) -> None:
        recipe, accelerator = self.recipe, self.accelerator
        self._print(
            f"MPO: {len(self.dataset)} pairs, {self.total_steps} steps of {self.order.global_batch_size} pairs "
            f"({accelerator.num_processes} process(es)), {self.trainable:,}/{self.total_params:,} trainable parameters, "
            f"layout {recipe.forward.layout}, reference: {type(self.reference).__name__ if self.reference else 'none'}"
        )
        if self.order.dropped_per_epoch:
            self._print(f"note: {self.order.dropped_per_epoch} pair(s) per epoch do not fill a global batch and are left out")
        self.policy.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="mpo", disable=not accelerator.is_main_process, dynamic_ncols=True)
        loader = self.micro_batch_loader()
        micro_batches = zip(loader.batch_sampler, loader)
        while self.step < self.total_steps:
            started = time.perf_counter()
            metrics = self.train_step(micro_batches)
            elapsed = time.perf_counter() - started
            self.step += 1
            metrics["tokens_per_s"] = metrics.pop("tokens") / elapsed
            metrics["pairs_per_s"] = metrics.pop("pairs") / elapsed
            metrics["epoch"] = self.step / max(1, self.order.steps_per_epoch)
            if self.metrics is not None and (self.step % recipe.train.log_every == 0 or self.step == self.total_steps):
                self.metrics.log(self.step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if recipe.train.save_every and self.step % recipe.train.save_every == 0 and self.step < self.total_steps:
                save_checkpoint(accelerator, recipe.output_dir, self.step, self.trainer_state(), recipe.train.keep_last)
        bar.close()
        save_checkpoint(accelerator, recipe.output_dir, self.step, self.trainer_state(), recipe.train.keep_last)
        final = save_final_model(accelerator, self.policy, self.processor, recipe)
        if self.fetch.skipped_count:
            self._print(f"skipped {self.fetch.skipped_count} pair(s); see {Path(recipe.output_dir) / 'skipped.jsonl'}")
        if self.fetch.truncated_count:
            self._print(f"truncated the responses of {self.fetch.truncated_count} pair(s) to data.max_length")
        self._print(f"final model saved to {final}")
        if self.metrics is not None:
            self.metrics.close()
        accelerator.end_training()


def run(recipe_path: str, overrides: list[str]) -> int:
    recipe = load_recipe(recipe_path, overrides)
    MPOTrainer(recipe).train()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from mpo.cli import exit_on_data_error

    return exit_on_data_error(lambda: run(argv[0], argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
