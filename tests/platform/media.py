"""Hand-made media files for bad-input tests (shared by the decoder and the data-path tests)."""

from __future__ import annotations

import io

import av
import numpy as np


def audio_only_mp4(frames: int = 8) -> bytes:
    """An MP4 that holds one AAC audio stream (``frames`` x 1024 silent samples) and no video."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(frames):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()
