"""Media files made on the spot for the tests: rotated, oversized, truncated images and short clips."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import av
import numpy as np
from PIL import Image

RED = (255, 0, 0)


def exif_rotated(path: Path, orientation: int = 6) -> Path:
    """A 4x2 black picture, red top-left pixel, stored with an EXIF orientation tag (6: the
    viewer turns it 90 degrees clockwise, so it shows 2 wide, 4 high, red top-right)."""
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())
    return path


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` with almost no pixel data after it (what a
    decompression bomb looks like before it is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def truncated_png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def write_clip(path: Path, frames: int, width: int = 64, height: int = 48, codec: str = "libx264", fmt: str | None = None) -> Path:
    """A clip whose frames all differ (the index in the red channel, a moving green band, noise),
    with B-frames and a key frame every 12 frames, so seeking matters."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"bf": "2", "g": "12", "keyint_min": "12", "sc_threshold": "0"} if codec == "libx264" else {}
        for i in range(frames):
            image = rng.integers(0, 24, (height, width, 3), dtype=np.uint8)
            image[..., 0] += np.uint8(i * 3 % 200)
            image[(2 * i) % height : (2 * i) % height + 6, :, 1] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
