"""The peer in ``mpo bench --against trl``: TRL's ``DPOTrainer`` in its MPO setting, as a GPU user
runs it.

TRL (``pip install -e .[trl]``, tested with 1.16) trains the same model on the same token ids:
``loss_type=["sigmoid", "bco_pair", "sft"]``, ``loss_weights=[0.8, 0.2, 1.0]``, beta 0.1, fp32 or
bf16 as the bench runs, no gradient checkpointing, no truncation, its default fused AdamW. A step
is what ``Trainer`` does per optimizer step, its data included: the micro-batch's rows fetched from
a ``datasets.Dataset`` (which decodes the images from their files) and collated by TRL's own
collator, then ``training_step`` (forward, reference forward, loss, backward), gradient clipping,
the optimizer step and ``zero_grad``.

* **Image pairs**: ``DataCollatorForVisionPreference`` on the rendered prompt, the responses and
  the decoded images; it tiles every image once per row (the vision tower then runs twice per
  pair for the policy and twice for the reference). TRL refuses ``precompute_ref_log_probs`` for
  vision data, so its reference runs live.
* **Text pairs**: ``DataCollatorForPreference`` on the pairs' token ids (TRL tokenizes a text
  dataset once, before training); ``trl_precomputed`` runs with ``precompute_ref_log_probs=True``,
  its reference log-probs computed by TRL's ``compute_ref_log_probs`` before the race, as its
  own precompute pass does.

**The LM head.** TRL's fused LM head (``add_fused_lm_head``) scores only the completion positions
where Triton runs (CUDA, XPU) and every position of every row elsewhere, the CPU included
(``trl/trainer/utils.py``, ``compact = _use_triton(device)``): on a CPU at InternVL3's vocabulary
that is most of TRL's step, a cost no GPU user pays. No TRL setting changes it. With ``--trl-head
gpu`` (the default) the bench gives TRL's two models the head's compact branch, exactly as TRL
takes it on a GPU (:func:`score_completions_only`: TRL's own ``ChunkedLogProbFunction`` on the
completion positions, scattered back into TRL's output); ``--trl-head cpu`` leaves TRL as it runs
on a CPU. Nothing in TRL's modules is changed; :func:`trl_settings` prints what was done.
"""

from __future__ import annotations

import copy
import tempfile
import types

import torch
from torch import nn

from mpo.tools.bench.measure import Work
from mpo.types import EncodedPair

TRL_HEADS = ("gpu", "cpu")
"""``--trl-head``: TRL's head as on a GPU (completion positions only) or as on a CPU (every position)."""


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def score_completions_only(model: nn.Module, outputs: tuple[str, ...]) -> None:
    """Gives ``model`` (already given TRL's fused head by ``DPOTrainer``) the fused head's compact
    branch, the one TRL takes where Triton runs: the backbone as TRL calls it, then TRL's
    ``ChunkedLogProbFunction`` on the hidden states whose next-token label is not -100 only, its
    per-token outputs scattered into ``[rows, T - 1]`` zeros (``masked_scatter``, as TRL does).

    InternVL's Qwen2 head has no bias, logit scale or soft-capping, and TRL's DPO passes no
    ``shift_labels``, temperature 1 and no router logits, so those branches of TRL's head are left
    out. A call without ``fused_lm_head=True`` goes to the forward TRL installed.

    Args:
        model: the policy or the reference, as ``DPOTrainer`` holds it.
        outputs: the per-token fields TRL asked of this model's head (``DPOTrainer`` asks the policy
            for ``log_probs``, ``entropy``, ``mean_logits`` and ``is_top1``, the reference for
            ``log_probs``).
    """
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput

    trl_forward = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        per_token = ChunkedLogProbFunction.apply(
            hidden[mask], self.get_output_embeddings().weight, None, labels[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs
        )
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
        )
        loss = -log_probs.sum() / mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def scores_every_position(device: torch.device, head: str) -> bool:
    """Whether TRL's fused LM head scores every position here: on a device without Triton, unless
    the bench gave it its GPU behaviour (``head == "gpu"``)."""
    from trl.kernels.chunked_logprob import _use_triton

    return head == "cpu" and not _use_triton(device)


def trl_inputs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """The rows ``DataCollatorForVisionPreference`` builds for ``pairs``, without TRL (for
    counting, :mod:`mpo.tools.bench.ideal`): ``[chosen...; rejected...]``, each ``[left-padded
    prompt | right-padded completion]``, and the tiles repeated for the rejected rows."""
    prompt_width = max(len(p.prompt_ids) for p in pairs)
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    completion_width = max(len(c) for c in completions)
    rows = 2 * len(pairs)
    input_ids = torch.full((rows, prompt_width + completion_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (pair, completion) in enumerate(zip(pairs + pairs, completions)):
        prompt_start = prompt_width - len(pair.prompt_ids)
        end = prompt_width + len(completion)
        input_ids[row, prompt_start:end] = torch.tensor(pair.prompt_ids + completion)
        attention_mask[row, prompt_start:end] = 1
        completion_mask[row, prompt_width:end] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    tiles = [p.pixel_values for p in pairs if p.pixel_values is not None]
    if tiles:
        inputs["pixel_values"] = torch.cat(tiles + tiles)
    return inputs


def trl_work(inputs: dict[str, torch.Tensor], every_position: bool) -> Work:
    """TRL's work for one forward of its batch ``inputs``: every row's slots, each real token
    attending causally to the real tokens before it, and its LM head scoring ``every_position``
    of every row or the completion tokens alone."""
    rows, width = inputs["input_ids"].shape
    lengths = inputs["attention_mask"].sum(1)
    attended = int((lengths * (lengths + 1) // 2).sum())
    return Work(rows * width, attended, rows * (width - 1) if every_position else int(inputs["completion_mask"].sum()))


def trl_settings(head: str, precompute: bool, workers: int, device: torch.device) -> str:
    """One line saying how TRL runs in this race."""
    if head == "gpu" and scores_every_position(device, "cpu"):
        scoring = ("LM head: completion positions only, as on CUDA/XPU (the bench gives TRL's two models the compact "
                   "branch of TRL's fused head: trl.kernels.ChunkedLogProbFunction on the completion positions)")
    elif scores_every_position(device, head):
        scoring = "LM head: every position of every row (TRL's own choice on a device without Triton)"
    else:
        scoring = "LM head: completion positions only (TRL's own choice on this device)"
    reference = ("precompute_ref_log_probs=True (TRL's compute_ref_log_probs before the race)" if precompute
                 else "reference model run live")
    return (f"TRL DPOTrainer, loss_type sigmoid+bco_pair+sft, weights 0.8/0.2/1.0, beta 0.1, max_length None, "
            f"no gradient checkpointing, its default fused AdamW, dataloader_num_workers={workers}, {reference}; {scoring}")


class TRLRun:
    """A TRL ``DPOTrainer`` around its own copy of the model (and of the reference, unless it
    precomputes).

    Args:
        model: the starting model (copied: TRL patches the forward of the models it gets).
        processor: the model's processor.
        frozen_vision: freeze the vision tower and the projector of TRL's policy.
        lr: the learning rate (weight decay 0.05, constant rate, clipping at 1.0, as the bench's
            own optimizer).
        bf16: train under bf16 autocast (TRL's ``bf16=True``).
        device: where the bench runs.
        head: ``gpu`` or ``cpu`` (:data:`TRL_HEADS`, module docstring).
        precompute: ``precompute_ref_log_probs=True`` (text pairs only; TRL refuses it for images).
    """

    def __init__(self, model: nn.Module, processor, frozen_vision: bool, lr: float, bf16: bool, device: torch.device,
                 head: str = "gpu", precompute: bool = False):
        from datasets import Dataset, disable_progress_bars
        from trl import DPOConfig, DPOTrainer

        disable_progress_bars()  # TRL's passes over the placeholder dataset would print bars into the tables

        policy = copy.deepcopy(model).train().requires_grad_(True)
        if frozen_vision:
            policy.model.vision_tower.requires_grad_(False)
            policy.model.multi_modal_projector.requires_grad_(False)
        self.args = DPOConfig(
            output_dir=tempfile.mkdtemp(prefix="mpo-bench-trl-"),
            loss_type=["sigmoid", "bco_pair", "sft"],
            loss_weights=[0.8, 0.2, 1.0],
            beta=0.1,
            learning_rate=lr,
            weight_decay=0.05,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            bf16=bf16,
            use_cpu=device.type == "cpu",
            gradient_checkpointing=False,
            max_length=None,
            precompute_ref_log_probs=precompute,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
        )
        # The trainer wants a dataset; the bench feeds it its own micro-batches (a text placeholder,
        # which TRL also accepts for its precompute pass at construction).
        placeholder = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
        reference = None if precompute else copy.deepcopy(model).eval()
        self.trainer = DPOTrainer(model=policy, ref_model=reference, args=self.args, train_dataset=placeholder,
                                  processing_class=processor)
        self.trainer.create_optimizer()
        # Trainer's training loop sets this before every training_step (one micro-batch a step).
        self.trainer.current_gradient_accumulation_steps = 1
        self.model = self.trainer.model
        self.precompute = precompute
        if head == "gpu" and scores_every_position(device, "cpu"):
            # The fields DPOTrainer asks of each head (trl/trainer/dpo_trainer.py, add_fused_lm_head calls).
            score_completions_only(self.model, ("log_probs", "entropy", "mean_logits", "is_top1"))
            if self.trainer.ref_model is not None:
                score_completions_only(self.trainer.ref_model, ("log_probs",))

    @torch.no_grad()
    def reference_logps(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` reference log-probs of a batch by TRL's ``compute_ref_log_probs``
        (what its ``precompute_ref_log_probs`` pass runs per batch), with the current policy:
        call it before training, while the policy is the reference."""
        chosen, rejected = self.trainer.compute_ref_log_probs(self.model, self.trainer._prepare_inputs(dict(inputs)))
        return chosen.cpu(), rejected.cpu()

    def step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on TRL's batch ``inputs``, as ``Trainer`` runs it; returns the loss."""
        trainer, model = self.trainer, self.model
        loss = trainer.training_step(model, inputs)
        trainer.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        trainer.optimizer.step()
        model.zero_grad()
        return loss
