"""InternVL media: the data-path rule, and images and video frames read from disk.

Shared by the trainer (``mpo.data``), ``mpo validate`` and the data pipeline, so a path is judged
by one rule and a response is scored on exactly the pixels it was sampled on. Prompts themselves
(chat template, placeholders, the tile budget) are :mod:`mpo.data.prompting`'s.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mpo.config import MAX_IMAGE_PIXELS
from mpo.errors import DataError

FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}

# The pixel limit is ``max_pixels``, checked from the header by ``open_image`` with the file named.
# Pillow's own guard is process-wide and raises (beyond twice its limit) an exception that names
# no file, so Pillow's documented switch turns it off and the data setting alone decides.
Image.MAX_IMAGE_PIXELS = None


def resolve_data_path(root: str | os.PathLike, path: str) -> Path:
    """The one rule for a data file's path (trainer and ``mpo-data`` alike), judged as written.

    ``path`` is relative to ``root`` or absolute. It is refused when it has a ``..`` component or
    is absolute outside ``root`` (compared as written, ``root`` made absolute without resolving
    links). Symbolic links are not followed: ``images -> /mnt/datasets/...`` inside the root was
    placed there by the user and is theirs to point anywhere.

    Returns:
        The absolute path (``root`` joined with ``path``), not checked for existence.

    Raises:
        DataError: naming the path and the root; the caller adds file, line and field.
    """
    if not isinstance(path, str) or not path:
        raise DataError("expected a non-empty path string")
    base = Path(os.path.abspath(root))
    if ".." in Path(path).parts:
        raise DataError(f"path {path!r} is outside the image root {base}: '..' is not allowed")
    joined = base / path  # an absolute ``path`` replaces ``base``
    if joined != base and base not in joined.parents:
        raise DataError(f"path {path!r} is outside the image root {base}")
    return joined


def check_data_file(path: Path, kind: str) -> None:
    """A cheap ``stat`` of a record's ``image`` or ``video``: present, a file (a video may also be a
    directory of frames) and not empty. Decoding is left to the loaders and ``mpo validate``."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}", field=kind) from None
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}", field=kind) from None
    if path.is_dir():
        if kind == "image":
            raise DataError(f"{path} is a directory, not an image file", field=kind)
    elif info.st_size == 0:
        raise DataError(f"{path} is an empty file (0 bytes)", field=kind)


def record_path(root: Path, relative, source: str, line: int, field: str) -> str:
    """A record's image or video path: the path rule, then a cheap stat (:func:`resolve_data_path`, then :func:`check_data_file`)."""
    try:
        path = resolve_data_path(root, relative)
        check_data_file(path, field)
    except DataError as error:
        raise DataError(error.reason, file=source, line=line, field=field) from None
    return str(path)


def open_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Opens an image and reads its header only, refusing one larger than ``max_pixels``.

    Raises:
        DataError: missing, unreadable, not an image, or too large (``data.max_image_pixels``).
    """
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}", field="image") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not an image file", field="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode image {path}: {error}", field="image") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DataError(_too_large("image", path, width, height, max_pixels), field="image")
    return image


def _too_large(kind: str, path, width: int, height: int, max_pixels: int) -> str:
    return (f"{kind} {path} is {width}x{height} = {width * height:,} pixels, more than data.max_image_pixels "
            f"({max_pixels:,}); raise that setting to accept it")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decodes an image to 8-bit RGB as it is meant to be seen.

    The EXIF orientation is applied (a phone photo stored sideways comes out upright), and 16-bit
    greyscale is scaled to 8 bits (``convert("RGB")`` alone clips it, so most of it turns white).

    Raises:
        DataError: as :func:`open_image`, or the pixel data is corrupt or truncated.
    """
    image = open_image(path, max_pixels)
    try:
        with image:
            image.load()
            upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode image {path}: {error}", field="image") from None
    if upright.mode in _SIXTEEN_BIT_MODES:
        # 0..65535 onto 0..255, rounded (65535 / 257 = 255 exactly).
        grey = np.clip(np.asarray(upright, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")
    if upright.mode == "F":
        raise DataError(f"cannot decode image {path}: 32-bit float pixels have no set range; store it as 8 or 16 bit",
                        field="image")
    return upright.convert("RGB")


def is_plain_rgb_file(path: str | os.PathLike) -> bool:
    """Whether any decoder reads the file's bytes as the pixels :func:`load_image` gives: 8-bit
    RGB or greyscale JPEG/PNG/WebP with no EXIF rotation (reads the header only)."""
    with open_image(path, max_pixels=1 << 62) as image:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        return image.format in ("JPEG", "PNG", "WEBP") and image.mode in ("RGB", "L") and orientation == 1


def load_video_frames(path: str | os.PathLike, num_frames: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Samples ``num_frames`` frames uniformly from a video file or a directory of frame images.

    InternVL samples the middle of each of ``num_frames`` equal segments; so does this. Only the
    picked frames are decoded to pixels (in a video file: a seek to the key frame before each pick,
    then decoding up to it), so a sample holds ``num_frames`` frames, never the whole clip.

    Returns:
        ``[num_frames, H, W, 3]`` uint8.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"video not found: {path}", field="video")
    if path.is_dir():
        files = frame_files(path)
        return np.stack([np.asarray(load_image(files[i], max_pixels)) for i in _segment_midpoints(len(files), num_frames)])
    import av

    try:
        with av.open(str(path)) as container:
            timestamps, keyframes = _packet_index(container, _video_stream(container, path, max_pixels), path)
        picks = _segment_midpoints(len(timestamps), num_frames)
        with av.open(str(path)) as container:
            frames = _decode_by_timestamp(container, container.streams.video[0], [timestamps[i] for i in picks], keyframes)
        if frames is None:
            with av.open(str(path)) as container:
                frames = _decode_in_order(container, container.streams.video[0], picks, path)
    except (av.error.FFmpegError, ValueError, OSError) as error:
        raise DataError(f"cannot decode video {path}: {error}", field="video") from None
    return np.stack(frames)


def _video_stream(container, path: Path, max_pixels: int):
    if not container.streams.video:
        raise DataError(f"cannot decode video {path}: no video stream", field="video")
    stream = container.streams.video[0]
    if stream.width * stream.height > max_pixels:
        raise DataError(_too_large("video", path, stream.width, stream.height, max_pixels), field="video")
    return stream


def probe_video(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Checks a video's header and that its first frame decodes (a frame directory: every frame
    image's header). Raises :class:`DataError` when it would fail to load."""
    path = Path(path)
    if path.is_dir():
        for file in frame_files(path):
            open_image(file, max_pixels).close()
        return
    import av

    try:
        with av.open(str(path)) as container:
            if next(iter(container.decode(_video_stream(container, path, max_pixels))), None) is None:
                raise DataError(f"video has no frames: {path}", field="video")
    except (av.error.FFmpegError, ValueError, OSError) as error:
        raise DataError(f"cannot decode video {path}: {error}", field="video") from None


def frame_files(directory: Path) -> list[Path]:
    """The frame images of a video stored as a directory, in name order."""
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise DataError(f"no frame images in directory {directory}", field="video")
    return files


def _packet_index(container, stream, path: Path) -> tuple[list, list]:
    """Reads the packets without decoding them: their count is the frame count, and their
    timestamps, sorted, the frames' presentation order; and the key frames' timestamps."""
    timestamps, keyframes = [], []
    for packet in container.demux(stream):
        if packet.size:  # the demuxer ends with an empty flush packet
            timestamps.append(packet.pts)
            if packet.is_keyframe:
                keyframes.append(packet.pts)
    if not timestamps:
        raise DataError(f"video has no frames: {path}", field="video")
    if None in timestamps or None in keyframes:
        return timestamps, []  # no timestamps to seek by
    return sorted(timestamps), sorted(keyframes)


def _decode_by_timestamp(container, stream, targets: list, keyframes: list) -> list[np.ndarray] | None:
    """The frames presented at ``targets`` (ascending), decoding as few frames as it can.

    Each target is reached by a seek to the last key frame at or before it (no seek when that key
    frame was already passed) and decoding up to it; only the targets are converted to pixels.
    Returns ``None`` when there is nothing to seek by or the container's index does not lead to
    the targets (the caller then decodes in order).
    """
    if not keyframes:
        return None
    frames, decoder, position = [], None, None
    for target in targets:
        key = keyframes[max(0, bisect.bisect_right(keyframes, target) - 1)]
        if decoder is None or key > position:
            container.seek(key, stream=stream, backward=True)
            decoder = container.decode(stream)
        frame = next((f for f in decoder if f.pts is None or f.pts >= target), None)
        if frame is None or frame.pts != target:
            return None
        position = frame.pts
        frames.append(frame.to_ndarray(format="rgb24"))
    return frames


def _decode_in_order(container, stream, picks: list[int], path: Path) -> list[np.ndarray]:
    """Decodes from the start, converting only the ``picks``-th frames (ascending)."""
    wanted, frames = set(picks), {}
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index == picks[-1]:
            break
    if len(frames) < len(picks):
        raise DataError(f"cannot decode video {path}: frame {picks[len(frames)]} does not decode", field="video")
    return [frames[i] for i in picks]


def _segment_midpoints(total: int, count: int) -> list[int]:
    count = min(count, total)
    return [int((i + 0.5) * total / count) for i in range(count)]
