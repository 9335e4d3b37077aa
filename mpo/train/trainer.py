"""The MPO trainer: a plain accelerate loop, no HF Trainer.

Launch (one process, DDP or DeepSpeed, CPU or GPU alike)::

    mpo train [--launch launch/zero2.yaml] recipes/tiny_cpu.yaml [key.sub=value ...]
    accelerate launch [--config_file launch/zero2.yaml] -m mpo.train recipes/tiny_cpu.yaml [key.sub=value ...]

How it departs from the official InternVL/TRL MPO trainer:
1. The reward shift delta is a running mean over optimizer steps (not micro-batches), used one step
   late, saved in checkpoints, and never moved by evaluation (see :class:`mpo.losses.RewardShift`
   and :meth:`MPOTrainer.evaluate`).
2. The SFT term defaults to the paper's per-response normalisation (``loss.sft_reduction``).
3. The vision tower runs once per pair, and the reference reuses the policy's image features
   when the vision tower and projector are frozen (``forward.dedupe_vision``); a text-only
   micro-batch runs it only where the launch needs it (:func:`mpo.model.forward.text_only_vision`).
4. The order of pairs is a pure function of (seed, step), so a resumed run sees exactly the pairs
   an uninterrupted one would, whatever the number of processes.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_scheduler

from mpo.config import Recipe, eval_metric_names, save_best_direction
from mpo.data.batch_order import GlobalBatchOrder, MicroBatchIndices, lockstep_micro_batches
from mpo.data.checks import load_checked_records
from mpo.data.dataset import PreferenceDataset
from mpo.data.heldout import load_eval_records
from mpo.data.layouts import build_collator
from mpo.errors import DataError
from mpo.jsonl import write_text_atomic
from mpo.losses import MPOLoss, RewardShift
from mpo.model.forward import ForwardOutput, PreferenceForward, text_only_vision
from mpo.model.loading import count_parameters, load_policy, vision_is_frozen
from mpo.model.reference import DisabledAdapterReference, FrozenModelReference
from mpo.train.checkpoint import (
    RECIPE_FILE, checkpoint_dirs, checkpoint_path, keep_weights_loadable, load_checkpoint, save_best, save_checkpoint,
    save_final_model, untouched_rng,
)
from mpo.train.console import metric_line, quiet_libraries, startup_summary
from mpo.train.distributed import (
    check_supported, check_zero3_gathers, configure_deepspeed, is_deepspeed, load_frozen_reference, make_accelerator,
    text_hidden_size, zero_config,
)
from mpo.train.evaluation import EvalSums, improves
from mpo.train.grad_accum import GradAccumulation
from mpo.train.guards import WeightGuard, step_one_lines
from mpo.train.metrics import MetricsWriter, StepStats
from mpo.train.optim import build_optimizer, zero_missing_gradients
from mpo.train.pairs import PairFetcher
from mpo.train.precision import check_precision, clip_grad_norm
from mpo.train.liveness import Liveness
from mpo.train.preflight import (check_before_loading, check_environment, check_reference_vocabulary,
                                 load_checked_processor)
from mpo.train.report import process_rank
from mpo.train.run_dir import claim_for_all
from mpo.train.signals import StopRequest, TrainingStopped, stop_with_launcher
from mpo.train.skip_log import SkipLog
from mpo.types import MPOLossOutput, PreferenceBatch


def _as_list(items: list) -> list:
    return items


class MPOTrainer:
    """Set up in the constructor (data, reference file, model, reference model, resume), then
    :meth:`train`; one instance per process."""

    def __init__(self, recipe: Recipe, overwrite: bool = False):
        """Args:
            recipe: the run.
            overwrite: start a new run where another one lives, moving the old one aside
                (:mod:`mpo.train.run_dir`); without it such a directory is refused.
        """
        self.recipe = recipe
        # First, so that a SIGTERM while the model loads still ends in a resumable stop.
        self.stop = StopRequest(announce=process_rank() == 0).install()
        stop_with_launcher()
        self.run_lock = self.liveness = None
        try:
            self._setup(overwrite)
        except BaseException:
            self.close()
            raise

    def _setup(self, overwrite: bool) -> None:
        recipe = self.recipe
        quiet_libraries()
        check_environment(recipe)
        self.accelerator = make_accelerator(recipe)
        self.liveness = Liveness.start(self.accelerator, recipe.train.collective_timeout)
        self.run_lock, notes = claim_for_all(recipe, self.accelerator, overwrite)
        for note in notes:
            self._print(f"note: {note}")
        set_seed(recipe.seed)
        if self.accelerator.is_main_process:
            write_text_atomic(Path(recipe.output_dir) / RECIPE_FILE, recipe.to_yaml())
        resume = self._setup_data()
        self.loss_fn = MPOLoss(
            beta=recipe.loss.beta,
            dpo_weight=recipe.loss.dpo_weight,
            bco_weight=recipe.loss.bco_weight,
            sft_weight=recipe.loss.sft_weight,
            sft_reduction=recipe.loss.sft_reduction,
        )
        self.reward_shift = RewardShift(recipe.loss.delta_mode, recipe.loss.delta_ema_decay)
        self._setup_model()
        self.reference = self._setup_reference()
        keep_weights_loadable(self.accelerator)
        self.step = 0
        self.best: dict | None = None  # the step, metric and value of output_dir/best
        self.resumed_from = resume
        if resume is not None:
            self._resume(resume)
        self.start_step = self.step
        self.weight_guard = WeightGuard(self.accelerator.unwrap_model(self.policy).model, self.accelerator)
        self.metrics = MetricsWriter(self.accelerator, recipe, self.step)

    def close(self) -> None:
        """Ends what the run holds in this process: the signal handlers, the watch of the other
        processes, the output directory's lock (the run calls it when it ends, however it ends)."""
        self.stop.restore()
        if self.liveness is not None:
            self.liveness.finish()
            self.liveness = None
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    # ------------------------------------------------------------------------------- setup

    def _setup_data(self) -> Path | None:
        """Records read and checked, the held-out split, the batch order, the datasets and the
        collator; a precomputed reference file opened and checked. Returns the checkpoint to
        resume from (checked before any model loads, like everything here)."""
        recipe, accelerator = self.recipe, self.accelerator
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

        self.processor = load_checked_processor(recipe.model)
        self.dataset = PreferenceDataset(train_records, self.processor, recipe.data)
        self.fetch = PairFetcher(self.dataset, skip, self.skip_log)
        self.eval_dataset = PreferenceDataset(eval_records, self.processor, recipe.data) if eval_records else None
        self.eval_fetch = PairFetcher(self.eval_dataset, skip, self.skip_log) if eval_records else None
        self.collate = build_collator(recipe.forward, recipe.data, self.processor.tokenizer.pad_token_id)
        self.precomputed = None
        if recipe.reference.precomputed_path:
            from mpo.model.precomputed import PrecomputedReference

            # Checked before any model loads, so a stale file is refused in seconds. It covers every
            # record of the data, held-out ones (data.eval_fraction) included.
            every_record = PreferenceDataset(records, self.processor, recipe.data)
            self.precomputed = PrecomputedReference.open(recipe.reference.precomputed_path, recipe, every_record)
        return resume

    def _setup_model(self) -> None:
        """The policy (freezing, LoRA, checkpointing), its optimizer and schedule, prepared for
        the launch; DeepSpeed's config written first."""
        recipe, accelerator, train = self.recipe, self.accelerator, self.recipe.train
        deepspeed = is_deepspeed(accelerator)
        check_precision(recipe.model.dtype, train.mixed_precision, deepspeed)
        if deepspeed:
            check_supported(accelerator, recipe.model)
            check_zero3_gathers(accelerator)
            # No dataloader goes through prepare(): DeepSpeed learns batch, accumulation and
            # clipping here, before ZeRO-3 partitions the weights as they load.
            configure_deepspeed(accelerator, train.micro_batch_size, train.gradient_accumulation_steps,
                                train.max_grad_norm, text_hidden_size(recipe.model), train.grad_accum_dtype)
        policy_model = load_policy(recipe.model)
        self.trainable, self.total_params = count_parameters(policy_model)
        self.reuse_features = recipe.forward.dedupe_vision and vision_is_frozen(policy_model)
        self.text_only_vision = text_only_vision(accelerator.num_processes, zero_config(accelerator))
        # One process without DeepSpeed: a tied embedding's lookup gradient can stay sparse.
        sparse_embedding = accelerator.num_processes == 1 and not deepspeed
        policy = PreferenceForward(policy_model, self.text_only_vision, sparse_embedding_gradient=sparse_embedding)
        if not deepspeed:
            policy.to(accelerator.device)  # fp32 masters are made where their weights live
        # DeepSpeed masters 16-bit weights itself; elsewhere the optimizer does.
        master_weights = not deepspeed and recipe.model.dtype != "float32"
        optimizer = build_optimizer(policy, recipe, master_weights, accelerator.device)
        scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer,
            num_warmup_steps=round(train.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.policy, self.optimizer, self.scheduler = accelerator.prepare(policy, optimizer, scheduler)
        self.grad_accumulation = GradAccumulation(self.policy, self.optimizer, train.grad_accum_dtype)

    def _setup_reference(self):
        """Where the reference log-probs come from: none (SFT only), the precomputed file, the
        LoRA policy with its adapters disabled, or a frozen copy of the starting checkpoint."""
        if not self.loss_fn.needs_reference:
            return None
        if self.precomputed is not None:
            return self.precomputed
        if self.recipe.model.lora.enabled:
            return DisabledAdapterReference(self.accelerator.unwrap_model(self.policy), self.reuse_features)
        if self.recipe.reference.name_or_path:
            check_reference_vocabulary(self.recipe, self.processor.tokenizer)
            # Another checkpoint's vision tower may hold other weights: it encodes the images itself.
            self.reuse_features = False
        return FrozenModelReference(load_frozen_reference(self.recipe, self.accelerator), self.reuse_features)

    def _resume(self, checkpoint: Path) -> None:
        """Weights, optimizer, schedule and RNG from ``checkpoint``; the step, delta and best."""
        state = load_checkpoint(self.accelerator, checkpoint)
        self.step = state["step"]
        self.reward_shift.load_state_dict(state["reward_shift"])
        self.best = state.get("best")
        self._print(f"resumed from {checkpoint} at step {self.step}, delta {self.reward_shift.value:.6f}")

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)

    # ------------------------------------------------------------------------------- steps

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
        for _ in range(self.order.accumulation_steps):
            indices, items = next(micro_batches)
            batch = self.collate(self.fetch.resolve(items, indices)).to(accelerator.device)
            # Gradients sum over the micro-batches; DDP all-reduces (and DeepSpeed steps) on the
            # last one only, which accumulate() marks.
            with accelerator.accumulate(self.policy), self.grad_accumulation.no_sync():
                policy_out, output = self.score(batch, delta)
                accelerator.backward(output.loss)
            self.grad_accumulation.after_backward()  # train.grad_accum_dtype: fp32
            if output.chosen_rewards is not None:
                self.reward_shift.accumulate(output.chosen_rewards, output.rejected_rewards)
            stats.add(output, policy_out.logps, batch.num_tokens, batch.num_pairs)
        grad_norm = self._optimizer_step()
        self.reward_shift.step(lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu())
        metrics = stats.reduce(accelerator)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["bco/delta"] = delta
        metrics["lr"] = lr
        return metrics

    def _optimizer_step(self) -> torch.Tensor | float | None:
        """The end of an accumulation: clip, step, schedule, zero. Returns the gradient norm.

        Under DeepSpeed the engine clipped and stepped inside the last backward; ``step`` and
        ``zero_grad`` of accelerate's wrapper are then no-ops and the engine reports the norm.
        """
        if self.text_only_vision == "skip":
            zero_missing_gradients(self.policy, self.optimizer.optimizer)  # a step without images (mpo.train.optim)
        self.grad_accumulation.reduce()
        grad_norm = clip_grad_norm(self.accelerator, self.policy, self.optimizer, self.recipe.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        if grad_norm is None and is_deepspeed(self.accelerator):
            grad_norm = self.policy.get_global_grad_norm()
        return grad_norm

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "reward_shift": self.reward_shift.state_dict(),
            "skipped": self.skip_log.refresh(),
            "best": self.best,
            "recipe": self.recipe.to_dict(),
        }

    # -------------------------------------------------------------------------- evaluation

    def evaluate(self, dataset: PreferenceDataset, fetch: PairFetcher) -> dict[str, float]:
        """Scores every held-out pair once with the current model and delta (:mod:`mpo.train.evaluation`).

        No gradient, delta not moved, the training RNG left as it was and the model put back in
        training mode: a run trains exactly the same with and without evaluation.

        Args:
            dataset: the held-out pairs.
            fetch: reports (or raises) the unusable ones, as for training.

        Returns:
            ``eval/loss``, ``eval/loss/<term>``, ``eval/rewards/*``, ``eval/logps/*``, ``eval/pairs``.
        """
        accelerator, loss = self.accelerator, self.loss_fn
        sums = EvalSums([name.removeprefix("eval/") for name in eval_metric_names(self.recipe.loss)],
                        {"dpo": loss.dpo_weight, "bco": loss.bco_weight, "sft": loss.sft_weight}, loss.sft_reduction == "token")
        batches = lockstep_micro_batches(range(len(dataset)), accelerator.process_index, accelerator.num_processes,
                                         self.recipe.train.micro_batch_size)
        delta = self.reward_shift.value
        fallback = None
        self.policy.eval()
        with untouched_rng(accelerator.device), torch.no_grad():
            for items in self.pair_loader(dataset, batches):
                pairs = fetch.usable(items)
                fallback = pairs or fallback
                # A process out of pairs still runs a forward (its values unused) to match the others'.
                batch = self.collate(pairs or fallback or fetch.resolve([dataset[0]], [0])).to(accelerator.device)
                policy_out, output = self.score(batch, delta)
                if pairs:
                    sums.add(output, policy_out.logps, batch.num_pairs)
        self.policy.train()
        return sums.reduce(accelerator)

    def evaluate_if_due(self) -> dict[str, float]:
        """The ``eval/*`` metrics when this step is an evaluation step (``train.eval_every``, the
        last step), keeping ``output_dir/best`` up to date; else nothing."""
        every = self.recipe.train.eval_every
        if self.eval_dataset is None or not (self.step == self.total_steps or every and self.step % every == 0):
            return {}
        results = self.evaluate(self.eval_dataset, self.eval_fetch)
        self._print(f"step {self.step}: eval/loss {results['eval/loss']:.4f} over {results['eval/pairs']:.0f} held-out pairs")
        train = self.recipe.train
        if train.save_best and improves(results[train.save_best], self.best and self.best["value"], save_best_direction(train)):
            self.best = {"step": self.step, "metric": train.save_best, "value": results[train.save_best]}
            save_best(self.accelerator, self.policy, self.processor, self.recipe, self.best)
        return results

    # ------------------------------------------------------------------------------- loop

    def train(self) -> None:
        """Trains to the last step and saves the final model.

        Raises:
            TrainingStopped: a SIGTERM or SIGINT stopped the run (after saving the step it
                reached, unless a second Ctrl-C asked to stop at once).
        """
        try:
            self._train()
        except KeyboardInterrupt:
            latest = checkpoint_dirs(self.recipe.output_dir)
            raise TrainingStopped("SIGINT", self.step, self.total_steps, latest[-1] if latest else None, saved=False,
                                  main_process=self.accelerator.is_main_process) from None
        finally:
            self.close()

    def _stop_if_asked(self, saved_now: bool) -> None:
        """Ends the run with :class:`TrainingStopped` when every process agrees a signal came,
        after writing the checkpoint of this step (unless ``saved_now``, or no step was trained)."""
        signal_name = self.stop.agreed(self.accelerator)
        if signal_name is None:
            return
        checkpoint = self.resumed_from
        if saved_now and self.step > self.start_step:
            checkpoint = checkpoint_path(self.recipe, self.step)
        elif self.step > self.start_step:
            checkpoint = save_checkpoint(self.accelerator, self.policy, self.processor, self.recipe, self.step, self.trainer_state())
        raise TrainingStopped(signal_name, self.step, self.total_steps, checkpoint, saved=checkpoint is not None,
                              main_process=self.accelerator.is_main_process)

    def _train(self) -> None:
        recipe, accelerator = self.recipe, self.accelerator
        self._print(startup_summary(self))
        self._stop_if_asked(saved_now=True)  # a signal while the model loaded
        self.policy.train()
        loader = self.micro_batch_loader()
        with untouched_rng(accelerator.device):
            micro_batches = zip(loader.batch_sampler, iter(loader))
        # A log file gets a metric line per logged step instead of a bar (mpo.train.console).
        terminal = sys.stderr.isatty()
        first_step, first_at = self.step, time.perf_counter()
        # `with`: an error mid-run closes the bar first, so its line is not glued to the bar's.
        with tqdm(total=self.total_steps, initial=self.step, desc="mpo", disable=not (accelerator.is_main_process and terminal),
                  dynamic_ncols=True) as bar:
            while self.step < self.total_steps:
                started = time.perf_counter()
                metrics = self.train_step(micro_batches)
                elapsed = time.perf_counter() - started
                self.step += 1
                self.weight_guard.check(self.step)  # before this step's checkpoint or evaluation
                if self.step == 1:
                    for line in step_one_lines(metrics, self.loss_fn, type(self.reference).__name__):
                        self._print(line)
                metrics["tokens_per_s"] = metrics.pop("tokens") / elapsed
                metrics["pairs_per_s"] = metrics.pop("pairs") / elapsed
                metrics["epoch"] = self.step / max(1, self.order.steps_per_epoch)
                evaluation = self.evaluate_if_due()
                metrics.update(evaluation)
                if self.step % recipe.train.log_every == 0 or self.step == self.total_steps or evaluation:
                    self.metrics.log(self.step, metrics)
                    if not terminal:
                        self._print(metric_line(self.step, self.total_steps, metrics, time.perf_counter() - first_at,
                                                self.step - first_step))
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                saved = bool(recipe.train.save_every and self.step % recipe.train.save_every == 0 and self.step < self.total_steps)
                if saved:
                    save_checkpoint(accelerator, self.policy, self.processor, recipe, self.step, self.trainer_state())
                if self.step < self.total_steps:
                    self._stop_if_asked(saved)
        save_checkpoint(accelerator, self.policy, self.processor, recipe, self.step, self.trainer_state())
        final = save_final_model(accelerator, self.policy, self.processor, recipe)
        skipped = self.skip_log.refresh()
        if skipped:
            self._print(f"skipped {skipped} pair(s); see {self.skip_log.path}")
        if self.fetch.truncated_count:
            self._print(f"truncated the responses of {self.fetch.truncated_count} pair(s) to data.max_length")
        self._print(f"final model saved to {final}")
        accelerator.end_training()


def run(recipe: Recipe, overwrite: bool = False) -> int:
    """Trains ``recipe`` in this process (one of a launch's processes, or alone).

    Raises:
        TrainingStopped: a signal stopped the run (:mod:`mpo.train.signals`).
    """
    MPOTrainer(recipe, overwrite).train()
    return 0
