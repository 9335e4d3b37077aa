"""InternVL media: images and video frames read from disk, for the prompt renderer.

Shared by the trainer (``mpo.data``) and the data pipeline, so a response is scored on exactly the
pixels it was sampled on. Prompts themselves (chat template, placeholders, the tile budget) are
:mod:`mpo.prompting`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mpo.errors import DataError


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
