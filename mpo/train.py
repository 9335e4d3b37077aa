"""The MPO training recipe: a plain accelerate loop, no HF Trainer.

Launch (one process, DDP or DeepSpeed, CPU or GPU alike)::

    mpo train [--launch launch/zero2.yaml] recipes/tiny_cpu.yaml [key.sub=value ...]
    accelerate launch [--config_file launch/zero2.yaml] -m mpo.train recipes/tiny_cpu.yaml [key.sub=value ...]

How it departs from the official InternVL/TRL MPO trainer:
1. The reward shift delta is a running mean over optimizer steps (not micro-batches), used one step
   late, saved in checkpoints, and never moved by evaluation (see :class:`mpo.losses.RewardShift`
   and :mod:`mpo.evaluate`).
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
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm import tqdm
from transformers import get_scheduler

from mpo.checkpoint import (
    RECIPE_FILE, check_zero3_gathers, keep_weights_loadable, load_checkpoint, save_best, save_checkpoint,
    untouched_rng, write_text_atomic,
)
from mpo.collate import build_collator
from mpo.config import Recipe, load_recipe
from mpo.console import quiet_libraries, startup_summary
from mpo.data import PreferenceDataset
from mpo.errors import DataError, OverlongPair
from mpo.evaluate import evaluate, improves, load_eval_records
from mpo.forward import ForwardOutput, PreferenceForward
from mpo.losses import MPOLoss, RewardShift
from mpo.metrics import MetricsWriter, StepStats
from mpo.modeling import count_parameters, load_policy, load_processor, load_reference, vision_is_frozen
from mpo.precision import MasterWeightAdamW, check_precision, clip_grad_norm
from mpo.preflight import check_before_loading
from mpo.reference import DisabledAdapterReference, FrozenModelReference
from mpo.sampling import GlobalBatchOrder
from mpo.saving import save_final_model
from mpo.skips import SkipLog
from mpo.types import EncodedPair, MPOLossOutput, PreferenceBatch
from mpo.validate import load_checked_records


def uses_deepspeed() -> bool:
    """Whether ``accelerate launch`` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(recipe: Recipe) -> Accelerator:
    handlers = []
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi_process_cpu:
        # NCCL needs GPUs; on CPU, DDP and DeepSpeed run over gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    # A GPU launch config (launch/ddp.yaml) on a machine without GPUs makes accelerate start every
    # process as a lone trainer that never syncs; cpu=True makes it CPU data parallel instead. Not
    # under DeepSpeed: there cpu=True would switch DeepSpeed off.
    use_deepspeed = uses_deepspeed()
    return Accelerator(
        # Trackers (report_to) write under output_dir/logs (tensorboard: logs/<project>/).
        log_with=recipe.report_to or None,
        project_config=ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "logs")),
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
    console, across processes and resumes) and replaced by the next good pair, so every process
    keeps the same micro-batch size and no collective operation waits on a process with less work.
    """

    def __init__(self, dataset: PreferenceDataset, skip: bool, skip_log: SkipLog):
        self.dataset, self.skip, self.skip_log = dataset, skip, skip_log
        self.truncated_count = 0

    def resolve(self, items: list[EncodedPair | DataError], indices: list[int]) -> list[EncodedPair]:
        return [self._usable(item, index) for item, index in zip(items, indices)]

    def usable(self, items: list[EncodedPair | DataError]) -> list[EncodedPair]:
        """The usable pairs of ``items``, the others reported (or raised) and left out."""
        return [item for item in items if self._accept(item)]

    def _accept(self, item: EncodedPair | DataError) -> bool:
        if isinstance(item, EncodedPair):
            self.truncated_count += item.truncated
            return True
        if not (self.skip or isinstance(item, OverlongPair)):
            raise item
        self._report(item)
        return False

    def _usable(self, item: EncodedPair | DataError, index: int) -> EncodedPair:
        for offset in range(1, len(self.dataset) + 1):
            if self._accept(item):
                return item
            item = self.dataset[(index + offset) % len(self.dataset)]
        raise DataError("every pair of the dataset is unusable")

    def _report(self, error: DataError) -> None:
        for new in self.skip_log.add([error]):
            tqdm.write(f"skipped {new}")


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
        quiet_libraries(uses_deepspeed())
        self.accelerator = accelerator = make_accelerator(recipe)
        set_seed(recipe.seed)
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)

        if accelerator.is_main_process:
            write_text_atomic(Path(recipe.output_dir) / RECIPE_FILE, recipe.to_yaml())

        skip = recipe.data.on_bad_sample == "skip"
        skipped: list[DataError] | None = [] if skip else None
        notes: list[str] = []
        records = load_checked_records(recipe, accelerator, skipped, notes)
        for note in notes:
            self._print(note)
        train_records, eval_records = load_eval_records(recipe.data, recipe.seed, records, skipped)
        train = recipe.train
        self.order = GlobalBatchOrder(
            num_records=len(train_records),
            micro_batch_size=train.micro_batch_size,
            accumulation_steps=train.gradient_accumulation_steps,
            world_size=accelerator.num_processes,
            seed=recipe.seed,
            shuffle=recipe.data.shuffle,
        )
        resume = check_before_loading(recipe, self.order)
        self.total_steps = train.max_steps or math.ceil(train.num_epochs * self.order.steps_per_epoch)
        # A fresh run starts its skip report over, on the main process before any other reads it.
        with accelerator.main_process_first():
            self.skip_log = SkipLog(recipe.output_dir, start_over=resume is None and accelerator.is_main_process)
        if skipped and accelerator.is_main_process:
            self.skip_log.add(skipped)

        self.processor = load_processor(recipe.model)
        self.dataset = PreferenceDataset(train_records, self.processor, recipe.data)
        self.fetch = PairFetcher(self.dataset, skip, self.skip_log)
        self.eval_dataset = PreferenceDataset(eval_records, self.processor, recipe.data) if eval_records else None
        self.eval_fetch = PairFetcher(self.eval_dataset, skip, self.skip_log) if eval_records else None
        self.collate = build_collator(recipe.forward, recipe.data, self.processor.tokenizer.pad_token_id)
        self.precomputed = None
        if recipe.reference.precomputed_path:
            from mpo.precompute import PrecomputedReference

            # Checked before any model loads, so a stale file is refused in seconds. It covers every
            # record of the data, held-out ones (data.eval_fraction) included.
            every_record = PreferenceDataset(records, self.processor, recipe.data)
            self.precomputed = PrecomputedReference.open(recipe.reference.precomputed_path, recipe, every_record)

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
            check_zero3_gathers(accelerator)
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
        keep_weights_loadable(accelerator)

        self.step = 0
        self.best: dict | None = None  # the step, metric and value of output_dir/best
        if resume is not None:
            state = load_checkpoint(accelerator, resume)
            self.step = state["step"]
            self.reward_shift.load_state_dict(state["reward_shift"])
            self.best = state.get("best")
            self._print(f"resumed from {resume} at step {self.step}, delta {self.reward_shift.value:.6f}")
        self.metrics = MetricsWriter(accelerator, recipe, self.step)

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

    def pair_loader(self, dataset: PreferenceDataset, batch_sampler) -> DataLoader:
        """The micro-batches of ``batch_sampler`` (lists of indices), encoded (images decoded and
        tiled) in ``data.num_workers`` background workers so the accelerator does not wait on
        JPEG decoding."""
        workers = self.recipe.data.num_workers
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=_as_list,
            num_workers=workers,
            prefetch_factor=2 if workers else None,
        )

    def micro_batch_loader(self) -> DataLoader:
        """Training pairs for the remaining steps."""
        sampler = MicroBatchIndices(self.order, self.step, self.total_steps, self.accelerator.process_index)
        return self.pair_loader(self.dataset, sampler)

    def score(self, batch: PreferenceBatch, delta: float) -> tuple[ForwardOutput, MPOLossOutput]:
        """The policy's forward on ``batch``, the reference's, and the MPO loss with shift ``delta``."""
        policy_out = self.policy(batch)
        reference_logps = None
        if self.reference is not None:
            # The same autocast as the policy's forward, so that at step 1 (policy ==
            # reference) every reward is exactly 0 in bf16 too.
            with self.accelerator.autocast():
                reference_logps = self.reference(batch, policy_out.image_features)
        return policy_out, self.loss_fn(policy_out.logps, reference_logps, delta)

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
                policy_out, output = self.score(batch, delta)
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
            "skipped": self.skip_log.refresh(),
            "best": self.best,
            "recipe": self.recipe.to_dict(),
        }

    def evaluate_if_due(self) -> dict[str, float]:
        """The ``eval/*`` metrics when this step is an evaluation step (``train.eval_every``, the
        last step), keeping ``output_dir/best`` up to date; else nothing."""
        every = self.recipe.train.eval_every
        if self.eval_dataset is None or not (self.step == self.total_steps or every and self.step % every == 0):
            return {}
        results = evaluate(self, self.eval_dataset, self.eval_fetch)
        self._print(f"step {self.step}: eval/loss {results['eval/loss']:.4f} over {results['eval/pairs']:.0f} held-out pairs")
        train = self.recipe.train
        if train.save_best and improves(results[train.save_best], self.best and self.best["value"], train.save_best_mode):
            self.best = {"step": self.step, "metric": train.save_best, "value": results[train.save_best]}
            save_best(self.accelerator, self.policy, self.processor, self.recipe, self.best)
        return results

    def train(self) -> None:
        recipe, accelerator = self.recipe, self.accelerator
        self._print(startup_summary(self))
        self.policy.train()
        loader = self.micro_batch_loader()
        with untouched_rng(accelerator.device):
            micro_batches = zip(loader.batch_sampler, iter(loader))
        # `with`: an error mid-run closes the bar first, so its line is not glued to the bar's.
        with tqdm(total=self.total_steps, initial=self.step, desc="mpo", disable=not accelerator.is_main_process,
                  dynamic_ncols=True) as bar:
            while self.step < self.total_steps:
                started = time.perf_counter()
                metrics = self.train_step(micro_batches)
                elapsed = time.perf_counter() - started
                self.step += 1
                metrics["tokens_per_s"] = metrics.pop("tokens") / elapsed
                metrics["pairs_per_s"] = metrics.pop("pairs") / elapsed
                metrics["epoch"] = self.step / max(1, self.order.steps_per_epoch)
                evaluation = self.evaluate_if_due()
                metrics.update(evaluation)
                if self.step % recipe.train.log_every == 0 or self.step == self.total_steps or evaluation:
                    self.metrics.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                if recipe.train.save_every and self.step % recipe.train.save_every == 0 and self.step < self.total_steps:
                    save_checkpoint(accelerator, self.policy, self.processor, recipe, self.step, self.trainer_state())
        save_checkpoint(accelerator, self.policy, self.processor, recipe, self.step, self.trainer_state())
        final = save_final_model(accelerator, self.policy, self.processor, recipe)
        skipped = self.skip_log.refresh()
        if skipped:
            self._print(f"skipped {skipped} pair(s); see {self.skip_log.path}")
        if self.fetch.truncated_count:
            self._print(f"truncated the responses of {self.fetch.truncated_count} pair(s) to data.max_length")
        self._print(f"final model saved to {final}")
        accelerator.end_training()


def run(recipe_path: str, overrides: list[str]) -> int:
    recipe = load_recipe(recipe_path, overrides)
    MPOTrainer(recipe).train()
    return 0


def main(argv: list[str] | None = None) -> int:
    from mpo.cli import train_command

    return train_command(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
