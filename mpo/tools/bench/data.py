"""The bench's pairs as a user's data, and each contender's way from it to a micro-batch.

A scenario's pairs are written as records whose images are JPEG files (:func:`make_records`), so
a timed step starts where a training step starts: from files. Each contender turns a step's
records into its micro-batch its own way, inside the timed step (or, with ``--data-workers``, in
background DataLoader workers that prefetch it, for both contenders alike):

* mpo: :class:`mpo.data.dataset.PreferenceDataset` (what the trainer's loader reads: the image
  decoded by :func:`mpo.data.media.load_image`, rendered and tiled once per pair by the chat
  template and the stock processor, the responses tokenized); the layout's collate follows in the
  step, as in the trainer.
* TRL: a ``datasets.Dataset`` whose image column decodes the files on access, and TRL's own
  collator (:mod:`mpo.tools.bench.peer_trl`); TRL's text dataset holds token ids, since TRL
  tokenizes text once before training.

Both see the same token ids (the prompt as the chat template renders it, each response followed
by the end-of-turn token) and the same tiles: :meth:`BenchData.check_trl_batch` checks it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mpo.config import DataConfig
from mpo.data.dataset import PreferenceDataset
from mpo.data.prompting import chat_messages, render
from mpo.types import EncodedPair, PreferenceRecord


@dataclass(frozen=True)
class Scenario:
    """The shape of a scenario's synthetic pairs (lengths drawn uniformly in the ranges).

    Attributes:
        images: images per prompt (0: text-only).
        tiles: tiles per image, thumbnail included.
        question: words of the question (one token each).
        response: tokens of each response, its end-of-turn token included.
    """

    name: str
    images: int
    tiles: tuple[int, int]
    question: tuple[int, int]
    response: tuple[int, int]


def vocabulary_words(tokenizer) -> list[str]:
    """Words the tokenizer holds as one token with their leading space (byte-level BPE's ``Ġ``),
    so a text of ``n`` of them is ``n`` tokens."""
    words = sorted(t for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)
    return [tokenizer.convert_tokens_to_string([word]) for word in words]


def write_image(path: Path, tiles: int, tile_size: int, rng: np.random.Generator) -> None:
    """A JPEG that InternVL's tiling cuts into ``tiles`` tiles: one tile alone, or a thumbnail and
    ``tiles - 1`` tiles in a row (an image ``tiles - 1`` times as wide as it is high). It is twice
    the grid's resolution, so the processor resizes it as it would a photo, and smooth (noise
    upsampled), so it compresses like one."""
    cells = max(1, tiles - 1)
    width, height = 2 * cells * tile_size, 2 * tile_size
    coarse = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(path, quality=90)


def make_records(scenario: Scenario, tokenizer, tile_size: int, count: int, seed: int, directory: Path) -> list[PreferenceRecord]:
    """``count`` records of ``scenario``'s shape, their images written under ``directory``.

    Each image's tile budget is its tile count, so the stock processor cuts it into exactly that
    many tiles whatever its default budget (TRL's collator uses the default).
    """
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    words = vocabulary_words(tokenizer)
    end = 1  # the end-of-turn token the dataset appends to each response

    def text(tokens: int) -> str:
        return "".join(rng.choice(words) for _ in range(tokens))

    records = []
    for index in range(count):
        images, tiles = [], 0
        for number in range(scenario.images):
            tiles = rng.randint(*scenario.tiles)
            path = directory / f"{scenario.name}-{seed}-{index}-{number}.jpg"
            write_image(path, tiles, tile_size, pixels)
            images.append(str(path))
        question = text(rng.randint(*scenario.question)).lstrip()
        chosen, rejected = (text(rng.randint(*scenario.response) - end) for _ in range(2))
        records.append(PreferenceRecord(question, chosen, rejected, images, source=f"{scenario.name}-{seed}:{index}",
                                        max_dynamic_patch=max(1, tiles - 1), system_prompt=None))
    return records


def _identity(item):
    return item


class _Steps(torch.utils.data.Dataset):
    """Step ``i`` -> ``make(i)``: a contender's micro-batch of one step, for a DataLoader."""

    def __init__(self, steps: int, make):
        self.steps, self.make = steps, make

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        return self.make(step)


def step_batches(steps: int, make, workers: int):
    """An iterator over ``make(0), make(1), ...``: made on demand in this process (``workers`` 0),
    or prefetched by that many DataLoader workers (two steps ahead each)."""
    if not workers:
        return (make(step) for step in range(steps))
    loader = DataLoader(_Steps(steps, make), batch_size=None, collate_fn=_identity, num_workers=workers,
                        prefetch_factor=2, worker_init_fn=_one_thread)
    return iter(loader)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


class BenchData:
    """A scenario's steps of records, as mpo's dataset and as TRL's.

    Args:
        records: the records of every step, ``records[step]`` one micro-batch.
        processor: the model's processor.
    """

    def __init__(self, records: list[list[PreferenceRecord]], processor):
        self.records = records
        self.processor = processor
        flat = [record for step in records for record in step]
        self.starts = np.cumsum([0] + [len(step) for step in records]).tolist()
        self.dataset = PreferenceDataset(flat, processor, DataConfig(max_length=1 << 20))
        self.has_images = any(record.images for record in flat)
        self.pairs = [self.mpo_pairs(step) for step in range(len(records))]  # for counting and precomputing

    def mpo_pairs(self, step: int) -> list[EncodedPair]:
        """Step ``step``'s pairs through mpo's dataset: decoded, tiled, tokenized."""
        pairs = [self.dataset[i] for i in range(self.starts[step], self.starts[step + 1])]
        for pair in pairs:
            if not isinstance(pair, EncodedPair):
                raise pair
        return pairs

    def trl_dataset(self, reference: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """TRL's ``datasets.Dataset`` of every pair, in step order: the images as an ``Image``
        column decoded from the files on access, the rendered prompt and the responses followed
        by the end-of-turn token (TRL's standard format); for text, the token ids, and the
        reference log-probs per step when given."""
        from datasets import Dataset, Image as ImageFeature, Sequence

        end = "<|im_end|>"
        if self.has_images:
            rows = {
                "images": [record.images for step in self.records for record in step],
                "prompt": [render(self.processor, chat_messages(r.question, len(r.images))) for step in self.records for r in step],
                "chosen": [r.chosen + end for step in self.records for r in step],
                "rejected": [r.rejected + end for step in self.records for r in step],
            }
            return Dataset.from_dict(rows).cast_column("images", Sequence(ImageFeature()))
        pairs = [pair for step in self.pairs for pair in step]
        rows = {"prompt_ids": [p.prompt_ids for p in pairs], "chosen_ids": [p.chosen_ids for p in pairs],
                "rejected_ids": [p.rejected_ids for p in pairs]}
        if reference is not None:
            rows["ref_chosen_logps"] = torch.cat([chosen for chosen, _ in reference]).tolist()
            rows["ref_rejected_logps"] = torch.cat([rejected for _, rejected in reference]).tolist()
        return Dataset.from_dict(rows)

    def trl_collator(self):
        """TRL's collator for this data, as ``DPOTrainer`` builds it."""
        from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference

        if self.has_images:
            return DataCollatorForVisionPreference(processor=self.processor)
        return DataCollatorForPreference(pad_token_id=self.processor.tokenizer.pad_token_id)

    def trl_maker(self, dataset, collator):
        """``step -> TRL's batch``: the rows fetched from ``dataset`` (images decoded), collated."""
        starts = self.starts

        def make(step: int) -> dict[str, torch.Tensor]:
            return collator([dataset[i] for i in range(starts[step], starts[step + 1])])

        return make

    def check_trl_batch(self, step: int, inputs: dict[str, torch.Tensor]) -> None:
        """TRL's batch of step ``step`` holds mpo's token ids and tiles (each pair's tiles once
        per row); raises naming what differs."""
        pairs = self.pairs[step]
        rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
        completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        for row, (ids, completion) in enumerate(zip(rows, completions)):
            mask = inputs["attention_mask"][row].bool()
            if inputs["input_ids"][row][mask].tolist() != ids or int(inputs["completion_mask"][row].sum()) != len(completion):
                raise AssertionError(f"step {step}, row {row}: TRL's token ids differ from mpo's")
        tiles = [p.pixel_values for p in pairs if p.pixel_values is not None]
        if tiles and not torch.equal(inputs["pixel_values"], torch.cat(tiles + tiles)):
            raise AssertionError(f"step {step}: TRL's tiles differ from mpo's")
