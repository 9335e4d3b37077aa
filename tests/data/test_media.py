"""Decoding: the pixels an image is meant to show, the pixel limit, and videos decoded frame by frame.

``mpo.data.media`` is the one decoder of the trainer, ``mpo validate`` and ``mpo-data`` (its sample
stage and its server), so these tests hold for all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from media_files import RED, exif_rotated, header_only_png, truncated_png, write_clip
from PIL import Image

from mpo.data.media import is_plain_rgb_file, load_image, load_video_frames, open_image
from mpo.errors import DataError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    """Old: the image came out as stored, 4x2 with red top-left (a phone photo trained sideways)."""
    image = load_image(exif_rotated(tmp_path / f"o6{suffix}"))
    assert image.size == (2, 4) and image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    if suffix == ".png":
        assert tuple(pixels[0, 1]) == RED and pixels.sum() == 255
    else:  # JPEG blurs the single red pixel, but it is top-right, not top-left
        assert pixels[0, 1, 0] > 100 and pixels[0, 0, 0] < pixels[0, 1, 0] and pixels[3, 0, 0] < 60


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """16-bit grey 0, 257, 32896, 65535 -> 0, 1, 128, 255 (value / 257, rounded); old: 0, 255,
    255, 255 (clipped: a 16-bit scan loaded as pure white)."""
    Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    pixels = np.asarray(load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_benign_images_decode(tmp_path):
    """1x1, palette, greyscale with alpha and CMYK all come out as 8-bit RGB of the right size."""
    cases = {
        "one.png": Image.new("RGB", (1, 1), (10, 20, 30)),
        "palette.png": Image.new("P", (3, 2), 5),
        "la.png": Image.new("LA", (2, 2), (77, 128)),
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert (loaded.mode, loaded.size) == ("RGB", image.size), name
    assert np.asarray(load_image(tmp_path / "one.png")).tolist() == [[[10, 20, 30]]]


def test_pixel_limit_is_a_setting_not_a_crash(tmp_path):
    """A header claiming 20000 x 20000 = 400 M pixels: refused from its header with the setting
    named (old: Pillow's DecompressionBombError, no file, no line). Raise the setting and the same
    file is decoded (and fails only because its pixel data is missing): Pillow's own guard is not
    in the way. A 100x60 image under a 5999-pixel limit is refused, under 6000 it loads."""
    bomb = header_only_png(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(DataError) as refused:
        load_image(bomb)
    assert str(refused.value) == (f"image: image {bomb} is 20000x20000 = 400,000,000 pixels, more than "
                                  "data.max_image_pixels (89,478,485); raise that setting to accept it")
    with pytest.raises(DataError, match=f"image: cannot decode image {bomb}"):
        load_image(bomb, max_pixels=500_000_000)
    Image.new("RGB", (100, 60)).save(tmp_path / "wide.png")
    with pytest.raises(DataError, match="100x60 = 6,000 pixels, more than data.max_image_pixels \\(5,999\\)"):
        open_image(tmp_path / "wide.png", max_pixels=5999)
    assert load_image(tmp_path / "wide.png", max_pixels=6000).size == (100, 60)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "cannot decode image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "cannot decode image"),
        (lambda p: p.mkdir(), "is a directory, not an image file"),
        (lambda p: p.write_bytes(truncated_png()), "cannot decode image"),
    ],
    ids=["zero-byte", "garbage", "directory", "truncated"],
)
def test_undecodable_images_are_data_errors(tmp_path, make, reason):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(DataError, match=reason) as error:
        load_image(path)
    assert error.value.field == "image" and "\n" not in str(error.value)


def test_only_plain_files_travel_as_their_own_bytes(tmp_path):
    """The OpenAI backend sends a file's bytes only when any decoder reads them as load_image
    does; an EXIF-rotated or 16-bit file goes as the decoded pixels (PNG), so a server sees what
    the trainer trains on."""
    from data_pipeline.openai_client import image_data_url as _image_data_url

    Image.new("RGB", (4, 2), RED).save(tmp_path / "plain.jpg")
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    rotated = exif_rotated(tmp_path / "o6.png")
    assert is_plain_rgb_file(tmp_path / "plain.jpg")
    assert not is_plain_rgb_file(rotated) and not is_plain_rgb_file(tmp_path / "g16.png")
    import base64
    import io

    for path in (rotated, tmp_path / "g16.png"):
        url = _image_data_url(load_image(path), path)
        assert url.startswith("data:image/png;base64,")
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")  # a server's plain decode
        np.testing.assert_array_equal(np.asarray(sent), np.asarray(load_image(path)))
    assert base64.b64decode(_image_data_url(load_image(tmp_path / "plain.jpg"), tmp_path / "plain.jpg").split(",", 1)[1]) == \
        (tmp_path / "plain.jpg").read_bytes()


# ---------------------------------------------------------------- video


def full_decode_picks(path: Path, num_frames: int) -> np.ndarray:
    """The old decoder: every frame to pixels, then the segment midpoints of the list."""
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    count = min(num_frames, len(frames))
    return np.stack([frames[int((i + 0.5) * len(frames) / count)] for i in range(count)])


@pytest.mark.parametrize(
    "name, codec, fmt",
    [("clip.mp4", "libx264", None), ("clip.mkv", "libx264", None), ("clip.webm", "libvpx", None),
     ("clip.h264", "libx264", "h264")],  # a raw stream has no timestamps: decoded in order
)
def test_picked_frames_equal_the_full_decode(tmp_path, name, codec, fmt):
    clip = write_clip(tmp_path / name, 61, codec=codec, fmt=fmt)
    for num_frames in (1, 3, 8, 16, 100):
        np.testing.assert_array_equal(load_video_frames(clip, num_frames), full_decode_picks(clip, num_frames), err_msg=str(num_frames))


def test_corrupt_and_empty_videos_are_data_errors(tmp_path):
    good = write_clip(tmp_path / "good.mp4", 30)
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[:200])
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    for name in ("cut.mp4", "junk.mp4"):
        with pytest.raises(DataError, match=f"video: .*{name}") as error:
            load_video_frames(tmp_path / name, 8)
        assert "\n" not in str(error.value)


_MEMORY_PROBE = """
import json, sys
from pathlib import Path
import av
import numpy as np
from mpo.data.media import load_video_frames

{old_decoder}

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))

warm_up, path, decoder = sys.argv[1:]
decode = load_video_frames if decoder == "new" else full_decode_picks
decode(warm_up, 8)  # maps the codec's code and its first buffers, which the measured call reuses
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS:")
frames = decode(path, 8)
print(json.dumps({{"extra": status("VmHWM:") - before, "frame": frames[0].nbytes}}))
"""


def _extra_memory(warm_up: Path, clip: Path, decoder: str) -> tuple[int, int]:
    import inspect

    probe = _MEMORY_PROBE.format(old_decoder=inspect.getsource(full_decode_picks))
    run = subprocess.run([sys.executable, "-c", probe, str(warm_up), str(clip), decoder], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    return result["extra"], result["frame"]


def test_video_memory_is_bounded_by_the_frames_kept(tmp_path):
    """200 frames of 320x240 (230 KB each as RGB): picking 8 holds those 8 (and the decoder's own
    few), not the clip. Measured in a fresh interpreter, after a warm-up call on a 12-frame clip of
    the same size: the peak resident memory reached during the call above the resident memory
    before it (the kernel's peak reset first) stays under 24 frames' worth; the old full decode
    needs about 190 more."""
    warm_up = write_clip(tmp_path / "short.mp4", 12, width=320, height=240)
    clip = write_clip(tmp_path / "long.mp4", 200, width=320, height=240)
    extra, frame = _extra_memory(warm_up, clip, "new")
    assert extra < 24 * frame, f"{extra / frame:.1f} frames"
    old, _ = _extra_memory(warm_up, clip, "old")
    assert old > 150 * frame, f"{old / frame:.1f} frames"  # the bound above really tells them apart


def test_video_frames_are_segment_midpoints(tiny_mmpr_dir):
    """3 of 8 frames: the middles of 3 equal segments, int((i + 0.5) * 8 / 3) = 1, 4, 6."""
    clip = tiny_mmpr_dir / "videos" / "clip0"
    frames = load_video_frames(clip, 3)
    expected = [np.asarray(Image.open(clip / f"frame_{i:02d}.png").convert("RGB")) for i in (1, 4, 6)]
    np.testing.assert_array_equal(frames, np.stack(expected))
