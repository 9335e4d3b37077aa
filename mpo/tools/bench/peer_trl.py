"""The peer in ``mpo bench --against trl``: TRL's ``DPOTrainer`` in its MPO setting.

TRL (``pip install -e .[trl]``, tested with 1.16) trains the same model on the same token ids:
``loss_type=["sigmoid", "bco_pair", "sft"]``, ``loss_weights=[0.8, 0.2, 1.0]``, beta 0.1, fp32 or
bf16 as the bench runs, no gradient checkpointing, no truncation, its default fused AdamW. The
micro-batch is what TRL's ``DataCollatorForVisionPreference`` builds from the same pairs: the
prompts left-padded and repeated for the chosen and the rejected rows, the completions
right-padded after them, every pair's tiles once per row (the vision tower runs twice per pair
for the policy and twice for the reference). A step is what ``Trainer`` does per optimizer step:
``training_step`` (forward, reference forward, loss, backward), gradient clipping, the optimizer
step and ``zero_grad``.

TRL's fused LM head scores only the completion positions where Triton runs (CUDA, XPU); elsewhere,
the CPU included, it scores every position of every row (``trl/kernels/chunked_logprob.py``,
``_use_triton``), so on a CPU it does far more LM-head work than on a GPU. :func:`trl_work` counts
what it does on the device at hand (:func:`scores_every_position`) and what it would do on a GPU.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from torch import nn

from mpo.tools.bench.measure import Work
from mpo.types import EncodedPair


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def trl_inputs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """TRL's vision preference batch for ``pairs``: rows ``[chosen...; rejected...]``, each
    ``[left-padded prompt | right-padded completion]``, and the tiles repeated for the rejected
    rows."""
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


def trl_work(pairs: list[EncodedPair], every_position: bool) -> Work:
    """TRL's work for one forward of ``pairs``: its LM head scores ``every_position`` of every row
    (off Triton devices) or the completion tokens alone (CUDA, XPU)."""
    inputs = trl_inputs(pairs, pad_id=0)
    rows, width = inputs["input_ids"].shape
    attended = sum((len(p.prompt_ids) + len(c)) * (len(p.prompt_ids) + len(c) + 1) // 2
                   for p in pairs for c in (p.chosen_ids, p.rejected_ids))
    return Work(rows * width, attended, rows * (width - 1) if every_position else int(inputs["completion_mask"].sum()))


def scores_every_position(device: torch.device) -> bool:
    """Whether TRL's fused LM head scores every position on ``device`` (no Triton there)."""
    from trl.kernels.chunked_logprob import _use_triton

    return not _use_triton(device)


class TRLRun:
    """A TRL ``DPOTrainer`` around its own copy of the model and of the reference.

    Args:
        model: the starting model (copied twice: TRL patches the forward of the models it gets).
        processor: the model's processor.
        frozen_vision: freeze the vision tower and the projector of TRL's policy.
        lr: the learning rate (weight decay 0.05, constant rate, clipping at 1.0, as the bench's
            own optimizer).
        bf16: train under bf16 autocast (TRL's ``bf16=True``).
        device: where the bench runs.
    """

    def __init__(self, model: nn.Module, processor, frozen_vision: bool, lr: float, bf16: bool, device: torch.device):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

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
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
        )
        # The trainer wants a dataset; it never reads it here (the bench feeds its own batches).
        placeholder = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
        self.trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(model).eval(), args=self.args,
                                  train_dataset=placeholder, processing_class=processor)
        self.trainer.create_optimizer()
        # Trainer's training loop sets this before every training_step (one micro-batch a step).
        self.trainer.current_gradient_accumulation_steps = 1
        self.pad_id = processor.tokenizer.pad_token_id
        self.model = self.trainer.model

    def step(self, pairs: list[EncodedPair]) -> torch.Tensor:
        """One optimizer step on ``pairs``, as ``Trainer`` runs it; returns the loss."""
        trainer, model = self.trainer, self.model
        loss = trainer.training_step(model, trl_inputs(pairs, self.pad_id))
        trainer.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        trainer.optimizer.step()
        model.zero_grad()
        return loss

    @torch.no_grad()
    def sequence_logps(self, pairs: list[EncodedPair]) -> torch.Tensor:
        """``[chosen..., rejected...]`` summed completion log-probs of the current policy, as TRL
        computes them for its loss (to compare with mpo's)."""
        inputs = {k: v.to(self.model.device) for k, v in trl_inputs(pairs, self.pad_id).items()}
        completion = inputs.pop("completion_mask")
        labels = inputs["input_ids"].masked_fill(completion == 0, -100)
        was_training = self.model.training
        self.model.eval()
        logps = self.model(**inputs, labels=labels, use_cache=False, fused_lm_head=True).log_probs.sum(1)
        self.model.train(was_training)
        return logps.float().cpu()
