"""A tiny InternVL taught a few fixed responses, so that sampling it draws a known mix.

A random tiny model never writes "Final answer:", so every response would be unparsable and no
correctness pair could exist. :func:`teach` runs full-batch SFT steps on each target after each
prompt until the loss sits near its floor (the branch between the targets is irreducible), so
sampling at temperature 1 draws each target about equally often and greedy decoding picks one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from data_pipeline.prompts import PromptTemplate, build_cot_prompt
from mpo.data.prompting import encode_prompt

MAX_STEPS = 400


def teach(model_dir: Path, image: Path, template: PromptTemplate, prompts: list[tuple[str, int]], targets: list[str],
          system_prompt: str | None, max_tiles: int, taught_loss: float) -> None:
    """Teaches the checkpoint in ``model_dir`` (rewritten in place) every target after every prompt.

    Args:
        image: the picture every prompt shows (each prompt with its number of copies of it).
        template: the chain-of-thought template the prompts are built with.
        prompts: (question, number of images) pairs.
        targets: the responses to learn, equally often.
        system_prompt: the system message the prompts are rendered with.
        max_tiles: the tile budget of the rendering.
        taught_loss: the loss under which the targets count as learnt.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    picture = Image.open(image).convert("RGB")
    rows, labels, tiles = [], [], []
    for question, count in prompts:
        images = [picture] * count
        prompt = build_cot_prompt(question, count, template)
        prompt_length = encode_prompt(processor, prompt, images, max_tiles, system_prompt)["input_ids"].shape[1]
        for target in targets:
            encoded = encode_prompt(processor, prompt, images, max_tiles, system_prompt, assistant_prefix=target + "<|im_end|>")
            label = encoded["input_ids"][0].clone()
            label[:prompt_length] = -100
            rows.append(encoded["input_ids"][0]), labels.append(label), tiles.append(encoded["pixel_values"])
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), processor.tokenizer.pad_token_id)
    label_ids = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, label) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)], label_ids[i, : len(ids)], mask[i, : len(ids)] = ids, label, 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    # Until the targets are learnt, not a fixed step count: how many steps that takes depends on
    # the torch/transformers build (60 sufficed on one, 100 are needed on another).
    for _ in range(MAX_STEPS):
        loss = model(input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat(tiles), labels=label_ids).loss
        if loss.item() < taught_loss:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < taught_loss, f"the tiny model did not learn the targets: loss {loss.item():.3f} after {MAX_STEPS} steps"
    model.save_pretrained(model_dir)
