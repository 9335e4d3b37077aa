"""The one prompt renderer: a question and its media in, the checkpoint's own chat template out.

Every path that turns a question into tokens goes through here: the trainer (:mod:`mpo.data`),
SFT and evaluation, every generation backend of the data pipeline, ``mpo-data serve`` and
Dropout-NTP. A response is therefore trained under exactly the prompt it was sampled under.

1. :func:`chat_messages` builds structured chat messages: an optional system message, the user
   turn as text / image / video parts (split at the ``<image>`` / ``<video>`` placeholders), and
   optionally a final assistant message that the model continues (Dropout-NTP's prefix).
2. :func:`render` applies the checkpoint's own chat template to them
   (``processor.apply_chat_template``), which is what vLLM, SGLang and ``transformers serve`` do
   with the same messages sent as OpenAI chat parts.
3. :func:`encode_messages` tokenizes that text and tiles the images with the stock processor, each
   image with :func:`tile_budget` tiles.

Placeholders. InternVL's -hf template renders an image part as ``<IMG_CONTEXT>\\n`` (a video part
as ``<video>\\n``), so one newline directly after a placeholder belongs to the placeholder:
``<image>\\nQuestion`` renders ``<img>…</img>\\nQuestion``, InternVL's own training format, and
``Image-1: <image>\\nImage-2: <image>\\n…`` likewise. A placeholder inside a sentence keeps the
template's newline: ``How <image> many?`` renders ``How <img>…</img>\\n many?``. (InternVL's
original code substituted the text in place, without that newline; no client that sends image
parts, which is how OpenAI-compatible servers take images, can produce that through the -hf
template, so it is rendered the template's way on every path here.)
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from mpo.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

# InternVL2.5/3 were trained with the official ``internvl2_5`` conversation template, which puts
# this system turn in front of every conversation that has none (LMDeploy, InternVL's generator,
# adds it too). The -hf checkpoints' chat template adds no system turn by itself.
INTERNVL_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

SYSTEM_PROMPT_CHOICES = (
    "auto: InternVL2.5/3's default system message (what the checkpoints were trained with); "
    "none: no system turn; any other text: that system message"
)

_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})\n?")


def resolve_system_prompt(setting: str) -> str | None:
    """The system message text of a ``system_prompt`` setting (``auto``, ``none`` or the text)."""
    if setting == "auto":
        return INTERNVL_SYSTEM_MESSAGE
    if setting == "none":
        return None
    return setting


def tile_budget(max_tiles: int, num_images: int) -> int:
    """Tiles per image when ``num_images`` images share ``max_tiles`` (InternVL's rule)."""
    return max(1, max_tiles // max(1, num_images))


def normalize_question(question: str, num_images: int, has_video: bool = False) -> str:
    """Checks the ``<image>`` count against the images, prepending the placeholders when absent.

    MMPR lines carry one ``<image>`` per image; a line may omit them (InternVL then puts one image
    first, or labels several as ``Image-1: <image>``…). A wrong non-zero count is an error rather
    than a guess.
    """
    found = question.count(IMAGE_PLACEHOLDER)
    if found == 0 and num_images:
        if num_images == 1:
            question = IMAGE_PLACEHOLDER + "\n" + question
        else:
            question = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images)) + question
    elif found != num_images:
        raise DataError(f"has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s)", field="question")
    if has_video and VIDEO_PLACEHOLDER not in question:
        question = VIDEO_PLACEHOLDER + "\n" + question
    return question


def user_parts(question: str) -> list[dict]:
    """The user turn as chat parts: text, ``{"type": "image"}`` and ``{"type": "video"}`` in order.

    One newline right after a placeholder is the template's own (see the module docstring).
    """
    parts = []
    for index, piece in enumerate(_PLACEHOLDER.split(question)):
        if index % 2:
            parts.append({"type": "image" if piece == IMAGE_PLACEHOLDER else "video"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def chat_messages(
    question: str,
    num_images: int,
    system_prompt: str | None = None,
    assistant_prefix: str = "",
    has_video: bool = False,
) -> list[dict]:
    """The messages of a one-turn prompt.

    Args:
        question: the user turn, with ``<image>`` (and ``<video>``) placeholders; checked and
            completed by :func:`normalize_question`.
        num_images: images that go with the question.
        system_prompt: the system message text, or None for no system turn.
        assistant_prefix: text the assistant turn starts with (Dropout-NTP continues from it).
        has_video: whether a video goes with the question.
    """
    question = normalize_question(question, num_images, has_video)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": user_parts(question)})
    if assistant_prefix:
        messages.append({"role": "assistant", "content": assistant_prefix})
    return messages


def render(processor, messages: list[dict]) -> str:
    """The prompt text by the checkpoint's chat template; a final assistant message is continued."""
    continuing = messages[-1]["role"] == "assistant"
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not continuing, continue_final_message=continuing
    )


def encode_messages(
    processor, messages: list[dict], images: list[Image.Image], max_tiles: int, video: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Tokenizes rendered messages and tiles their images (``max_patches``: :func:`tile_budget`).

    Returns:
        ``input_ids`` ``[1, T]``, ``attention_mask`` ``[1, T]`` and, with images or video,
        ``pixel_values`` ``[tiles, 3, H, W]`` (images first, then video frames, one tile each).
    """
    kwargs = {}
    if images:
        kwargs["images"] = images
        kwargs["max_patches"] = tile_budget(max_tiles, len(images))
    if video is not None:
        kwargs["videos"] = [video]
    encoded = processor(text=render(processor, messages), return_tensors="pt", **kwargs)
    return {key: encoded[key] for key in ("input_ids", "attention_mask", "pixel_values") if key in encoded}


def encode_prompt(
    processor,
    question: str,
    images: list[Image.Image],
    max_tiles: int,
    system_prompt: str | None = None,
    assistant_prefix: str = "",
    video: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`chat_messages` then :func:`encode_messages`: a question's prompt as the model sees it."""
    messages = chat_messages(question, len(images), system_prompt, assistant_prefix, has_video=video is not None)
    return encode_messages(processor, messages, images, max_tiles, video)
