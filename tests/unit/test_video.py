"""The BLS model's mp4 encoder: H.264 in yuv420p at the requested fps, every frame kept."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import av
import numpy as np
import pytest

BLS_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "wan_pipeline" / "1"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_pipeline_{name}", BLS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


video = _load("video")


def gradient_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth moving content, so the lossy codec keeps it close (noise would not survive crf 18)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [np.stack([(x * 255 // width + 8 * t) % 256, y * 255 // height, np.full_like(x, 128)], axis=-1)
              for t in range(num_frames)]
    return np.asarray(frames, dtype=np.uint8)


@pytest.mark.parametrize("num_frames, height, width, fps", [(17, 96, 160, 16), (1, 32, 48, 8), (33, 64, 64, 24)])
def test_mp4_decodes_with_frame_count_size_fps_and_pixel_format(num_frames, height, width, fps):
    frames = gradient_frames(num_frames, height, width)
    data = video.encode_mp4(frames, fps)

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (width, height)
        assert stream.average_rate == fps
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 8  # lossy, but the same picture


def test_mp4_index_comes_first_for_progressive_playback():
    data = video.encode_mp4(gradient_frames(5, 32, 32), 16)
    assert data.index(b"moov") < data.index(b"mdat")


@pytest.mark.parametrize("frames, message", [
    (np.zeros((2, 31, 32, 3), np.uint8), "even height and width"),
    (np.zeros((2, 32, 32, 3), np.float32), "uint8"),
    (np.zeros((32, 32, 3), np.uint8), "uint8 [F, H, W, 3]"),
])
def test_bad_frames_are_rejected(frames, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        video.encode_mp4(frames, 16)
