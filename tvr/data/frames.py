"""Decode T frames of a clip with PyAV, resize + centre-crop, normalise: bytes -> (T, 3, S, S).

Frame sampling (X-Pool / CLIP4Clip style, over the N frames of the clip or of its segment): the
clip is cut into T equal segments ``[k N / T, (k+1) N / T)``;

- ``mode="uniform"`` (evaluation) takes the middle frame of each segment,
- ``mode="random"`` (training) takes a uniformly random frame of each segment (random offset).

A clip with fewer than T frames gives all its frames followed by copies of the last one
(``DecodeResult.padded`` is True) -- the rule the platform records in its quarantine report.

Backends (``backend=``; the platform's ``data.decoder``): ``"pyav"`` (the default and the
reference, described below) and ``"torchcodec"`` (:func:`_decode_torchcodec`, PyTorch's maintained
FFmpeg decoder, used when importable *and* its FFmpeg libraries load; :func:`torchcodec_available`).
torchcodec seeks exactly to the same frame indices (presentation order, the same
:func:`sample_indices`), converts at native size (pixels equal to PyAV's) and resizes with
``torch.nn.functional.interpolate`` (bicubic, antialiased) + the same centre crop: resized pixels
differ from PyAV's swscale bicubic by a few levels, so it is not the default (the published
pipelines' pixels are PyAV/FFmpeg's). Whatever torchcodec cannot do -- a segment (``segment=``),
``force_sequential``, or a stream it fails to open or decode -- goes to PyAV (the fallback), so
error reporting and the padding / patching rules are always PyAV's. ``"auto"`` = torchcodec when
available, else PyAV.

Decoding only what is needed: the container is demuxed once (packets only, no decoding) to get
every frame's timestamp and the keyframes. For each sampled frame the decoder starts at the last
keyframe at or before it -- jumping over whole GOPs that contain no sampled frame -- and only the
sampled frames are converted to RGB. If a sampled frame does not come out (open GOPs, damaged
streams) the whole clip is decoded sequentially instead (the fallback), and if even that lacks it
the nearest decoded frame is used and a warning is returned. Streams that cannot be demuxed or
decoded at all raise :class:`DecodeError` with the reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

import av
import numpy as np

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class DecodeError(ValueError):
    """A clip cannot be decoded (not a media file, no video stream, no frame)."""


@dataclass(kw_only=True)
class DecodeResult:
    frames: np.ndarray
    """(T, S, S, 3) uint8 RGB (or native H, W when size is None)."""
    indices: np.ndarray
    """(T,) frame index (presentation order, within the clip or segment) of each output frame."""
    num_source_frames: int
    padded: bool = False
    method: Literal["index", "sequential"] = "index"
    warnings: list[str] = field(default_factory=list)


def sample_indices(n: int, num_frames: int, *, mode: Literal["uniform", "random"] = "uniform",
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """(T,) frame indices in [0, n): segment middles (uniform) or random offsets (random).

    n < T: ``arange(n)`` then the last index repeated (padding by the last frame).
    """
    if n < 1:
        raise DecodeError("clip has no frames")
    if n < num_frames:
        return np.concatenate([np.arange(n), np.full(num_frames - n, n - 1)]).astype(np.int64)
    edges = np.linspace(0, n, num_frames + 1)                                 # (T+1,)
    lo, hi = np.floor(edges[:-1]).astype(np.int64), np.floor(edges[1:]).astype(np.int64)
    hi = np.maximum(hi, lo + 1)
    if mode == "uniform":
        mid = np.floor((edges[:-1] + edges[1:]) / 2).astype(np.int64)        # segment middles
        return np.clip(mid, lo, hi - 1)
    if mode == "random":
        rng = rng if rng is not None else np.random.default_rng()
        return rng.integers(lo, hi).astype(np.int64)                         # high exclusive
    raise ValueError(f"sampling mode {mode!r}: choose 'uniform' or 'random'")


def _to_rgb(frame: av.VideoFrame, size: int | None) -> np.ndarray:
    """Frame -> (S, S, 3) uint8: shorter side resized to S (bicubic, as CLIP), centre crop."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    w, h = frame.width, frame.height
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    arr = frame.to_ndarray(format="rgb24", width=nw, height=nh, interpolation="BICUBIC")  # (nh, nw, 3)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def _open(data: bytes | io.IOBase):
    buf = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        container = av.open(buf, mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as err:
        raise DecodeError(f"not a readable media file ({type(err).__name__}: {err})") from None
    if not container.streams.video:
        container.close()
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise DecodeError(f"no video stream (found: {', '.join(kinds)}; audio-only file?)")
    return container


Backend = Literal["pyav", "torchcodec", "auto"]
BACKENDS = ("pyav", "torchcodec", "auto")
_TORCHCODEC: list[str | None] = []                      # [None] usable, [reason] not; [] not probed yet


def torchcodec_unavailable_reason() -> str | None:
    """None when torchcodec imports and its FFmpeg libraries load, else why not (probed once)."""
    if not _TORCHCODEC:
        try:
            from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads libtorchcodec + FFmpeg)

            _TORCHCODEC.append(None)
        except Exception as err:                          # ImportError, OSError/RuntimeError (no FFmpeg)
            _TORCHCODEC.append(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
    return _TORCHCODEC[0]


def torchcodec_available() -> bool:
    return torchcodec_unavailable_reason() is None


def resolve_backend(backend: str) -> Literal["pyav", "torchcodec"]:
    """``"auto"`` -> torchcodec when available else PyAV; ``"torchcodec"`` when it is not
    available -> :class:`ValueError` naming the reason; unknown names -> :class:`ValueError`."""
    if backend not in BACKENDS:
        raise ValueError(f"decode backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "pyav":
        return "pyav"
    reason = torchcodec_unavailable_reason()
    if backend == "auto":
        return "pyav" if reason else "torchcodec"
    if reason:
        raise ValueError(f"data.decoder=torchcodec but torchcodec is not usable here ({reason}); install "
                         "torchcodec and FFmpeg's shared libraries (4-8), or set data.decoder=pyav")
    return "torchcodec"


def decode_frames(data: bytes | io.IOBase, num_frames: int, *, size: int | None = None,
                  mode: Literal["uniform", "random"] = "uniform", rng: np.random.Generator | None = None,
                  segment: tuple[float, float] | None = None, force_sequential: bool = False,
                  backend: Backend = "pyav") -> DecodeResult:
    """Sample ``num_frames`` frames of a clip given as bytes (see the module docstring)."""
    if isinstance(data, bytes | bytearray) and len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    if resolve_backend(backend) == "torchcodec" and segment is None and not force_sequential:
        if not isinstance(data, bytes | bytearray | memoryview):
            data.seek(0)
            data = data.read()
        state = rng.bit_generator.state if rng is not None else None
        try:
            return _decode_torchcodec(bytes(data), num_frames, size=size, mode=mode, rng=rng)
        except Exception:                                 # torchcodec cannot open / decode it: PyAV decides
            if rng is not None:
                rng.bit_generator.state = state           # the same offsets as a PyAV-only decode
    warnings: list[str] = []
    container = _open(data)
    try:
        vs = container.streams.video[0]
        vs.thread_type = "NONE"
        tb = float(vs.time_base) if vs.time_base else 1.0
        packets: list[av.Packet] = []
        try:
            for pkt in container.demux(vs):
                if pkt.size > 0 and pkt.pts is not None:
                    packets.append(pkt)
        except av.error.FFmpegError as err:
            warnings.append(f"demux stopped early ({type(err).__name__}); file truncated?")
        all_pts = sorted(p.pts for p in packets)
        if segment is not None:
            start, end = segment
            all_pts = [p for p in all_pts if start <= p * tb < end] or all_pts
        if not all_pts:
            raise DecodeError("no video frames in the stream")
        idx = sample_indices(len(all_pts), num_frames, mode=mode, rng=rng)
        wanted = [all_pts[i] for i in idx]
        got: dict[int, np.ndarray] = {}
        method: Literal["index", "sequential"] = "index"
        if not force_sequential:
            got = _decode_by_index(vs, packets, sorted(set(wanted)), size)
        if len(got) < len(set(wanted)):
            method = "sequential"
            got = _decode_sequential(data, set(wanted), size, got)
        missing = [p for p in wanted if p not in got]
        if missing:
            if not got:
                raise DecodeError("no frame could be decoded (corrupt stream)")
            warnings.append(f"{len(set(missing))} sampled frame(s) undecodable; used the nearest decoded frame")
            keys = np.array(sorted(got))
            for p in missing:
                got[p] = got[int(keys[np.abs(keys - p).argmin()])]
        frames = np.stack([got[p] for p in wanted])                              # (T, S, S, 3)
        return DecodeResult(frames=frames, indices=idx, num_source_frames=len(all_pts),
                            padded=len(all_pts) < num_frames, method=method, warnings=warnings)
    finally:
        container.close()


def _decode_torchcodec(data: bytes, num_frames: int, *, size: int | None,
                       mode: Literal["uniform", "random"], rng: np.random.Generator | None) -> DecodeResult:
    """The torchcodec backend: exact seeking to the :func:`sample_indices` frames, native-size RGB,
    then bicubic (antialiased) resize of the shorter side to ``size`` and the centre crop."""
    import torch
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NCHW")
    n = int(dec.metadata.num_frames or 0)
    idx = sample_indices(n, num_frames, mode=mode, rng=rng)
    uniq = sorted(set(idx.tolist()))
    x = dec.get_frames_at(uniq).data                                          # (k, 3, H, W) uint8
    if size is not None:
        h, w = x.shape[-2:]
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nh, nw) != (h, w):
            with torch.no_grad():
                y = torch.nn.functional.interpolate(x.float(), size=(nh, nw), mode="bicubic",
                                                    align_corners=False, antialias=True)
            x = y.round_().clamp_(0, 255).to(torch.uint8)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    frames = x.permute(0, 2, 3, 1).contiguous().numpy()                       # (k, S, S, 3)
    pos = {f: i for i, f in enumerate(uniq)}
    return DecodeResult(frames=frames[[pos[i] for i in idx.tolist()]], indices=idx, num_source_frames=n,
                        padded=n < num_frames, method="index")


def _decode_by_index(vs, packets: list, wanted: list[int], size: int | None) -> dict[int, np.ndarray]:
    """Decode from the keyframe before each wanted pts, skipping GOPs without wanted frames."""
    ctx = vs.codec_context
    key_pos = [i for i, p in enumerate(packets) if p.is_keyframe]
    if not key_pos or key_pos[0] != 0:
        return {}                                        # no usable index: let the caller fall back
    pos_of = {p.pts: i for i, p in enumerate(packets)}
    got: dict[int, np.ndarray] = {}
    remaining = set(wanted)
    cur = 0                                              # next packet to feed
    try:
        for target in wanted:
            if target in got:
                continue
            pos = pos_of[target]
            gop = key_pos[np.searchsorted(key_pos, pos, side="right") - 1]
            if gop > cur:                                # skip whole GOPs: restart at that keyframe
                ctx.flush_buffers()
                cur = gop
            while target not in got:
                if cur < len(packets):
                    frames = ctx.decode(packets[cur])
                    cur += 1
                else:
                    frames = ctx.decode(None)            # drain delayed frames at the end
                    if not frames:
                        break
                for f in frames:
                    if f.pts in remaining:
                        got[f.pts] = _to_rgb(f, size)
                        remaining.discard(f.pts)
    except (av.error.FFmpegError, KeyError):
        pass                                             # the caller falls back to sequential decoding
    return got


def _decode_sequential(data: bytes | io.IOBase, wanted: set[int], size: int | None,
                       got: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Decode every frame in order, converting only the wanted ones (the correct fallback)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        data.seek(0)
    got = dict(got)
    container = _open(data)
    try:
        vs = container.streams.video[0]
        vs.thread_type = "NONE"
        try:
            for pkt in container.demux(vs):
                try:
                    for f in pkt.decode():
                        if f.pts in wanted and f.pts not in got:
                            got[f.pts] = _to_rgb(f, size)
                except av.error.InvalidDataError:
                    continue
        except av.error.FFmpegError:
            pass
    finally:
        container.close()
    return got


def decode_all(data: bytes, size: int | None = None) -> np.ndarray:
    """Every frame of a clip, (N, H, W, 3) uint8 (a reference decoder for tests and benchmarks)."""
    container = _open(data)
    try:
        return np.stack([_to_rgb(f, size) for f in container.decode(video=0)])
    finally:
        container.close()


def normalize(frames: np.ndarray, mean: tuple[float, ...] = OPENAI_MEAN,
              std: tuple[float, ...] = OPENAI_STD) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32, (x / 255 - mean) / std per channel.

    Computed as ``x * (1 / (255 std)) - mean / std`` in place on the channels-first copy (one
    pass over float32 memory instead of four; equal to the formula within float32 rounding)."""
    std32 = np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * std32)).astype(np.float32)[:, None, None]        # (3, 1, 1)
    bias = (-np.asarray(mean, np.float64) / std32).astype(np.float32)[:, None, None]
    x = frames.transpose(0, 3, 1, 2).astype(np.float32, order="C")          # (T, 3, H, W)
    x *= scale
    x += bias
    return x


def normalize_on_device(frames, mean: tuple[float, ...] = OPENAI_MEAN, std: tuple[float, ...] = OPENAI_STD,
                        *, valid=None, device=None):
    """The model's input from the data path's frames, computed on ``device`` (the training /
    embedding device): (..., T, H, W, 3) uint8 -> (..., T, 3, H, W) float32,
    ``(x / 255 - mean) / std`` per channel -- the same float32 operations as :func:`normalize`
    (``x * (1 / (255 std))`` then ``+ (-mean / std)``, each rounded once), so the result equals the
    CPU path's bit for bit on CPU and to float32 rounding elsewhere.

    ``valid`` ((...,) bool, optional): rows that are False (clips that could not be decoded) come
    out as all-zero frames, as the float path shipped them. Frames that are already floating point
    (normalised by the caller) are returned as they are, moved to ``device``.

    Only uint8 travels through the data pipeline (1 byte a value instead of 4) and the
    normalisation runs where the model runs (torch is imported here, not at module level, so that
    decode workers stay light).
    """
    import torch

    x = torch.as_tensor(frames)
    if x.is_floating_point():
        return x.to(device) if device is not None else x
    if x.dtype != torch.uint8 or x.ndim < 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (..., T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.to(device, non_blocking=True) if device is not None else x
    std64 = np.asarray(std, np.float64)
    scale = torch.from_numpy((1.0 / (255.0 * std64)).astype(np.float32)).to(x.device)[:, None, None]  # (3,1,1)
    bias = torch.from_numpy((-np.asarray(mean, np.float64) / std64).astype(np.float32)).to(x.device)[:, None, None]
    out = torch.empty((*x.shape[:-3], 3, *x.shape[-3:-1]), dtype=torch.float32, device=x.device)
    out.copy_(x.movedim(-1, -3))                                             # (..., T, 3, H, W), exact
    out.mul_(scale)
    out.add_(bias)
    if valid is not None:
        keep = torch.as_tensor(valid, device=x.device).bool()                # (...,)
        if not bool(keep.all()):
            out.masked_fill_(~keep.reshape(*keep.shape, 1, 1, 1, 1), 0.0)
    return out
