"""Builds small randomly initialised InternVL checkpoints, saved as real HF directories.

Tests, demos and benchmarks run on these so that the code path that loads them is exactly the one
that loads ``OpenGVLab/InternVL3-8B-hf`` on a cluster: ``AutoModelForImageTextToText`` and
``AutoProcessor`` over a directory, offline. The model is the stock
``InternVLForConditionalGeneration`` (InternViT-style vision tower, pixel-shuffle projector,
Qwen2 language model); the processor is the stock ``InternVLProcessor`` with InternVL's dynamic
tiling (GotOcr2 image processor, ``crop_to_patches``) and video processor; the tokenizer is a
byte-level BPE trained here from a built-in corpus, with ChatML special tokens.

Command line: ``mpo tiny-model OUT_DIR [--size tiny|small|bench] [--seed N]`` (:mod:`mpo.cli.tiny_model`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# The chat template InternVL's -hf checkpoints ship (OpenGVLab/InternVL3-*-hf, written by
# transformers' convert_internvl_weights_to_hf.py), character for character, so every test and demo
# renders prompts through the real template: ChatML turns, an image part as "<IMG_CONTEXT>\n", a
# video part as "<video>\n", and no system turn unless the conversation has one.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Dimensions of a tiny InternVL. ``tile`` is the vision input side in pixels."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    tile: int
    patch: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int


SIZES = {
    # ~0.2 M parameters: unit tests, 16 image tokens per tile.
    "tiny": TinySize(32, 2, 2, 64, 8, 64, 2, 4, 2, 128, 1024),
    # a few million parameters: the end-to-end demo, still seconds per step on CPU.
    "small": TinySize(64, 2, 4, 64, 8, 192, 4, 6, 2, 512, 2048),
    # tens of millions of parameters, 64 image tokens per tile: benchmarks where compute dominates.
    "bench": TinySize(256, 4, 4, 128, 8, 512, 6, 8, 4, 1536, 4096),
}


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: English, digits, punctuation, the answer formats."""
    words = (
        "the a an of to in and is are there how many what which shape shapes colour color red green blue "
        "yellow circle circles square squares triangle triangles left right top bottom above below more "
        "fewer than total count counting image picture question answer final options option choose "
        "please think step by step reason carefully when you are ready use format yes no describe "
        "boxed frame video chart document table text number value correct wrong because so first then"
    ).split()
    lines = [" ".join(words[i : i + 9]) for i in range(0, len(words), 3)]
    lines += [f"Final answer: {x}" for x in list("ABCDE") + [str(n) for n in range(100)]]
    lines += ["\\boxed{" + str(n) + "}" for n in range(20)]
    lines += ["A. yes\nB. no", "(A) (B) (C) (D)", "1.5 2.25 3% 45° 10cm 0.001 -7 +3 = * / ( ) [ ] { } , . ; : ? !"]
    lines += [w.capitalize() for w in words]
    lines.append(INTERNVL_SYSTEM_MESSAGE)  # the default system turn: a few tokens, as in a real vocabulary
    return lines


def build_tokenizer(vocab_size: int, corpus: Sequence[str] | None = None):
    """Trains a byte-level BPE and wraps it for the InternVL processor.

    Args:
        vocab_size: target vocabulary size (special tokens included).
        corpus: the training text; the built-in :func:`_corpus` when None. A model meant for one
            task (the demo's shapes) learns its words as single tokens, so responses stay short.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = CHAT_TOKENS + list(IMAGE_TOKENS.values())
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus() * 4 if corpus is None else list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        extra_special_tokens=IMAGE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.padding_side = "left"  # generation pads on the left; training collates by hand
    return tokenizer


def build_processor(tokenizer, tile: int, patch: int, max_patches: int = 12):
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    image_processor = GotOcr2ImageProcessor(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    video_processor = InternVLVideoProcessor(
        size={"height": tile, "width": tile},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    tokens_per_tile = (tile // patch) ** 2 // 4  # pixel shuffle 0.5 keeps a quarter of the patches
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )



def build_model(size: TinySize, tokenizer, seed: int):
    from transformers import AutoModelForImageTextToText, InternVLConfig

    vision = dict(
        hidden_size=size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        intermediate_size=size.vision_hidden * 4,
        image_size=[size.tile, size.tile],
        patch_size=[size.patch, size.patch],
    )
    text = dict(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        intermediate_size=size.text_intermediate,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(size.tile // size.patch) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    # from_config (not the class constructor) so the same builder works under ZeRO-3 init.
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = text["pad_token_id"]
    return model


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    size: str = "tiny",
    seed: int = 0,
    max_patches: int = 12,
    corpus: Sequence[str] | None = None,
) -> Path:
    """Writes a random InternVL checkpoint with its processor to ``out_dir`` (atomically).

    Args:
        out_dir: target directory; replaced if it exists.
        size: one of :data:`SIZES`.
        seed: seeds the weights (the tokenizer is deterministic).
        max_patches: the processor's default tile budget (InternVL's ``max_dynamic_patch``).
        corpus: text to train the tokenizer on (default: the built-in corpus); the special tokens
            are always added, and the vocabulary is at most the size's ``vocab_size``.

    Returns:
        The directory, loadable with ``AutoModelForImageTextToText.from_pretrained``.
    """
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose from {sorted(SIZES)}")
    dims = SIZES[size]
    tokenizer = build_tokenizer(dims.vocab_size, corpus)
    processor = build_processor(tokenizer, dims.tile, dims.patch, max_patches)
    model = build_model(dims, tokenizer, seed)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint should be readable like any other
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
