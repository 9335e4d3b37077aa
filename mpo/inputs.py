"""InternVL prompts: images and video frames in, chat-formatted token ids and tiles out.

Shared by the trainer (``mpo.data``) and the data pipeline's generation backends, so a response is
scored in exactly the format it was sampled in. The tiling is the stock processor's (InternVL's
dynamic tiling: 1..max tiles chosen by aspect ratio plus a thumbnail), and several images share
the tile budget the way InternVL does: ``max(1, max_tiles // n_images)`` each.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mpo.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image as RGB, raising :class:`DataError` for a missing or corrupt file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}", field="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"cannot decode image {path}: {error}", field="image") from None


def load_video_frames(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """Samples ``num_frames`` frames uniformly from a video file or a directory of frame images.

    InternVL samples the middle of each of ``num_frames`` equal segments; so does this.

    Returns:
        ``[num_frames, H, W, 3]`` uint8.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"video not found: {path}", field="video")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp", ".bmp"})
        if not files:
            raise DataError(f"no frame images in directory {path}", field="video")
        picks = _segment_midpoints(len(files), num_frames)
        return np.stack([np.asarray(load_image(files[i])) for i in picks])
    import av

    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError) as error:
        raise DataError(f"cannot decode video {path}: {error}", field="video") from None
    if not frames:
        raise DataError(f"video has no frames: {path}", field="video")
    return np.stack([frames[i] for i in _segment_midpoints(len(frames), num_frames)])


def _segment_midpoints(total: int, count: int) -> list[int]:
    count = min(count, total)
    return [int((i + 0.5) * total / count) for i in range(count)]


def normalize_question(question: str, num_images: int, has_video: bool = False) -> str:
    """Checks the ``<image>`` count against the images, prepending the placeholders when absent.

    MMPR lines carry one ``<image>`` per image; a single-image line may omit it (InternVL then puts
    the image first). A wrong non-zero count is an error rather than a guess.
    """
    found = question.count(IMAGE_PLACEHOLDER)
    if found == 0 and num_images:
        question = IMAGE_PLACEHOLDER + "\n" + question if num_images == 1 else "".join(
            f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images)
        ) + question
    elif found != num_images:
        raise DataError(f"has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s)", field="question")
    if has_video and VIDEO_PLACEHOLDER not in question:
        question = VIDEO_PLACEHOLDER + "\n" + question
    return question


def build_chat_prompt(processor, question: str, num_images: int, assistant_prefix: str = "", has_video: bool = False) -> str:
    """The ChatML text of a one-turn prompt, image placeholders in the processor's own token.

    Args:
        processor: an ``InternVLProcessor``.
        question: the user turn, with ``<image>`` (and ``<video>``) placeholders.
        num_images: images that go with the question.
        assistant_prefix: text the assistant turn starts with (Dropout-NTP continues from it).
        has_video: whether a video goes with the question.
    """
    question = normalize_question(question, num_images, has_video)
    question = question.replace(IMAGE_PLACEHOLDER, processor.image_token).replace(VIDEO_PLACEHOLDER, processor.video_token)
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{assistant_prefix}"


def encode_prompt(
    processor,
    question: str,
    images: list[Image.Image],
    max_tiles: int,
    assistant_prefix: str = "",
    video: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenizes a prompt and tiles its images.

    Returns:
        ``input_ids`` ``[1, T]``, ``attention_mask`` ``[1, T]`` and, with images or video,
        ``pixel_values`` ``[tiles, 3, H, W]`` (images first, then video frames, one tile each).
    """
    text = build_chat_prompt(processor, question, len(images), assistant_prefix, has_video=video is not None)
    kwargs = {}
    if images:
        kwargs["images"] = images
        kwargs["max_patches"] = max(1, max_tiles // len(images))
    if video is not None:
        kwargs["videos"] = [video]
    encoded = processor(text=text, return_tensors="pt", **kwargs)
    return {key: encoded[key] for key in ("input_ids", "attention_mask", "pixel_values") if key in encoded}
