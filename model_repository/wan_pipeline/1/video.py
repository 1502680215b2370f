"""MP4 encoding of uint8 frames (H.264, yuv420p) to bytes, with PyAV."""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction

import numpy as np


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """uint8 frames [F, H, W, 3] (RGB) -> the bytes of an H.264/yuv420p MP4 at `fps` frames per second.

    yuv420p subsamples chroma 2x2, so height and width must be even (the model's multiples of 16 are)."""
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even height and width, got {height}x{width}")

    # A real file, not BytesIO: "faststart" (index first, so players can start before the end) rewrites it.
    with tempfile.TemporaryDirectory(prefix="wan_mp4_") as folder:
        path = os.path.join(folder, "video.mp4")
        _write(path, frames, fps, crf)
        with open(path, "rb") as file:
            return file.read()


def _write(path: str, frames: np.ndarray, fps: int, crf: int) -> None:
    import av

    num_frames, height, width, _ = frames.shape
    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
