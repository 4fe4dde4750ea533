"""A synthetic text-video retrieval dataset: real H.264 MP4 clips of moving coloured shapes.

Every clip shows two objects on a dark background, over ``N = seconds * fps`` frames split in
three equal phases ``[0, a)``, ``[a, b)``, ``[b, N)`` with ``a = N // 3``, ``b = 2N // 3``:

- the *mover* (colour, shape) rests at its start point in phase 1, moves in a straight line
  (left, right, up or down) in phase 2 and rests at its end point in phase 3;
- the *other* object (always of another colour) appears and then
  stays still, either in the middle of phase 1 (``order="appear_first"``: "a blue square appears,
  then a red circle moves left") or in the middle of phase 3 (``order="move_first"``: "a red
  circle moves left, then a blue square appears").

The direction is invisible to mean pooling of frames: a left-moving clip and the right-moving clip
with start and end swapped have identical frame means (start and end rest equally long). The
order of events changes only how long the other object is visible (a weak cue for mean pooling);
telling it apart properly needs temporal modelling. Colours and shapes are easy, so a tiny CLIP
learns the task in minutes and temporal methods have something left to win.

Captions are template sentences, several per clip, all true and differently worded (verb
synonyms, "then" / "before" / "after" constructions), from a vocabulary of 4 colours, 3 shapes,
4 directions and a handful of function words.

Caption modes (``captions=``):

- ``"events"`` (default, the set above): every caption is an event sentence (direction + order).
- ``"static"`` (image-text pre-training, ``tvr pretrain``): both objects are visible on every
  frame (``event="stays"``), and every caption says only what any single frame shows: the two
  shapes and colours, their size (``small`` / ``large``) and the background (``black``, ``grey``,
  ``navy``), e.g. "a large red circle and a large blue square on a grey background".
- ``"mixed"`` (the method benchmark): clips also vary in size and background, and the other object
  either appears or *disappears*; each clip has static captions (as above) and *temporal* ones
  that only the video answers: motion direction, event order, counts over time ("one shape at
  first, two at the end") and which of the two objects moves. Every caption is tagged with its
  type in ``caption_types.json`` (``{video_id: ["static" | "temporal", ...]}``, caption order).
  Clips come in *twins* ``video2k`` / ``video2k+1`` (always in the same split): the second is the
  time reversal of the first (:func:`mirror_spec`: the mover's path reversed, appears <->
  disappears, before <-> after) on another background. A clip and its exact time reversal have
  the same multiset of frames, so any permutation-invariant pooling of per-frame features (mean
  pooling) gives both the same representation while their temporal captions differ: such a
  model cannot answer the temporal queries (beyond chance between the twins), only static ones.

Annotation files are written in the real MSR-VTT release format, as CLIP4Clip / X-Pool read them:

- ``MSRVTT_data.json``: ``{"info": {...}, "videos": [{"category", "url", "video_id",
  "start time", "end time", "split", "id"}], "sentences": [{"caption", "video_id", "sen_id"}]}``
- ``MSRVTT_train.9k.csv`` (column ``video_id``): every non-test clip,
  ``MSRVTT_train.7k.csv``: the clips whose JSON split is ``train`` or ``validate``;
- ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``): the test clips with their
  first caption (the 1k-A protocol of JSFusion).

As in the real release, some 9k training clips carry JSON split ``"test"`` / ``"validate"``.
Everything is a pure function of ``seed`` (the MP4 bytes included: x264 runs single-threaded).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Literal, Protocol

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
ORDERS: tuple[str, ...] = ("move_first", "appear_first")
BACKGROUND = (16, 16, 16)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": BACKGROUND, "grey": (120, 120, 120), "navy": (20, 24, 90)}
SIZES: dict[str, float] = {"small": 0.10, "large": 0.18}
"""Object radius as a fraction of the frame side (``captions="static"|"mixed"``; events mode: 0.14)."""
EVENTS: tuple[str, ...] = ("appears", "disappears")
CAPTION_MODES: tuple[str, ...] = ("events", "static", "mixed")
CAPTION_TYPES: tuple[str, ...] = ("static", "temporal")
CAPTION_TYPES_FILE = "caption_types.json"
MSRVTT_FILES = ("MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv")

_MOVE_VERBS = ("moves {d}", "slides {d}", "goes {d}")
_APPEAR_VERBS = ("appears", "shows up")
# (template, order); {A} = mover phrase, {M} = its motion, {B} = other object, {P} = "appears".
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "move_first": (
        "{A} {M}, then {B} {P}",
        "first {A} {M}, and after that {B} {P}",
        "{B} {P} after {A} {M}",
        "{A} {M} before {B} {P}",
    ),
    "appear_first": (
        "{B} {P}, then {A} {M}",
        "first {B} {P}, and after that {A} {M}",
        "{A} {M} after {B} {P}",
        "{B} {P} before {A} {M}",
    ),
}


class BytesWriter(Protocol):
    """Anything with ``write_bytes(relative_path, data)`` (e.g. ``tvr_platform.storage.Storage``)."""

    def write_bytes(self, path: str, data: bytes) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """Everything needed to render one clip; positions are pixel centres (x, y)."""

    video_id: str
    mover_colour: str
    mover_shape: str
    direction: Literal["left", "right", "up", "down"]
    other_colour: str
    other_shape: str
    order: Literal["move_first", "appear_first"]
    start: tuple[float, float]
    end: tuple[float, float]
    other_pos: tuple[float, float]
    radius: float
    num_frames: int
    size: int
    fps: int
    event: Literal["appears", "disappears", "stays"] = "appears"
    """What the other object does: appears (and stays), disappears, or is visible throughout."""
    background: str = "black"
    size_word: str = ""
    """'small' / 'large' in the static and mixed caption modes ('' = the events-mode radius)."""

    @property
    def phases(self) -> tuple[int, int]:
        """(a, b): the mover moves during frames [a, b)."""
        return self.num_frames // 3, (2 * self.num_frames) // 3

    @property
    def appear_frame(self) -> int:
        """First frame on which an appearing other object is visible (for ``event="appears"``)."""
        a, b = self.phases
        return a // 2 if self.order == "appear_first" else b + (self.num_frames - b) // 2

    def mover_position(self, t: int) -> tuple[float, float]:
        """Centre of the mover on frame ``t``."""
        a, b = self.phases
        p = float(np.clip((t - a) / max(b - 1 - a, 1), 0.0, 1.0))
        return (self.start[0] + p * (self.end[0] - self.start[0]),
                self.start[1] + p * (self.end[1] - self.start[1]))

    def other_visible(self, t: int) -> bool:
        if self.event == "stays":
            return True
        if self.event == "disappears":  # the time reversal of the appearing clip with the other order
            return mirror_spec(self).other_visible(self.num_frames - 1 - t)
        return t >= self.appear_frame


_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def mirror_spec(spec: ClipSpec, *, video_id: str | None = None, background: str | None = None) -> ClipSpec:
    """The time reversal of ``spec``: start and end swapped (so the opposite direction), appears <->
    disappears, and the order of the two events swapped. When the rests before and after the move
    are equally long (``num_frames % 3 == 0``), frame ``t`` of the mirror is frame ``N - 1 - t`` of
    ``spec`` (on the same background), exactly."""
    event = {"appears": "disappears", "disappears": "appears", "stays": "stays"}[spec.event]
    order = "move_first" if spec.order == "appear_first" else "appear_first"
    return dataclass_replace(spec, video_id=video_id or spec.video_id, direction=_OPPOSITE[spec.direction],
                             start=spec.end, end=spec.start, event=event, order=order,
                             background=background or spec.background)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5                  # (S, S) each
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # upward, apex at cy - r, base at cy + 0.7 r
        top, base = cy - r, cy + 0.7 * r
        half_w = (yy - top) / (base - top) * r
        return (yy >= top) & (yy <= base) & (np.abs(dx) <= half_w)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_frames(spec: ClipSpec) -> np.ndarray:
    """The clip's frames, (N, S, S, 3) uint8 RGB."""
    n, s = spec.num_frames, spec.size
    frames = np.empty((n, s, s, 3), dtype=np.uint8)
    frames[:] = BACKGROUNDS[spec.background]
    other = _shape_mask(spec.other_shape, *spec.other_pos, spec.radius, s)
    for t in range(n):
        if spec.other_visible(t):
            frames[t][other] = COLOURS[spec.other_colour]
        mover = _shape_mask(spec.mover_shape, *spec.mover_position(t), spec.radius, s)
        frames[t][mover] = COLOURS[spec.mover_colour]                    # the mover is drawn on top
    return frames


def encode_mp4(frames: np.ndarray, fps: int, *, keyint: int | None = None, crf: int = 18) -> bytes:
    """(N, H, W, 3) uint8 RGB -> H.264 MP4 bytes (libx264 ultrafast, yuv420p, keyframe every
    ``keyint`` frames, default one per second). H and W must be even."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        k = keyint or fps
        stream.options = {"preset": "ultrafast", "crf": str(crf), "threads": "1",
                          "x264-params": f"keyint={k}:min-keyint={k}:scenecut=0"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def sample_spec(rng: np.random.Generator, video_id: str, *, num_frames: int, size: int, fps: int,
                mode: str = "events") -> ClipSpec:
    """Draw one clip: colours (distinct), shapes, direction, order and positions; in the static and
    mixed caption modes also the object size, the background and (mixed) appears / disappears."""
    colours = list(COLOURS)
    ci = rng.permutation(len(colours))[:2]
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    r = size * 0.14
    lo, hi = 0.2 * size, 0.8 * size
    # The mover travels along a band in one half of the frame; the other object sits in the other half.
    band_first = bool(rng.integers(2))
    band = rng.uniform(0.25, 0.35) * size if band_first else rng.uniform(0.65, 0.75) * size
    across = rng.uniform(0.3, 0.7) * size
    other_band = (rng.uniform(0.65, 0.75) if band_first else rng.uniform(0.25, 0.35)) * size
    if direction in ("left", "right"):
        a, b = ((hi, band), (lo, band)) if direction == "left" else ((lo, band), (hi, band))
        other = (across, other_band)
    else:  # image y grows downwards: "up" goes from high y to low y
        a, b = ((band, hi), (band, lo)) if direction == "up" else ((band, lo), (band, hi))
        other = (other_band, across)
    extra: dict[str, Any] = {}
    if mode != "events":  # drawn after the events-mode draws, so that mode's clips are unchanged
        size_word = ("small", "large")[int(rng.integers(2))]
        r = size * SIZES[size_word]                              # positions stay, the radius changes
        extra = {"size_word": size_word, "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
                 "event": "stays" if mode == "static" else EVENTS[int(rng.integers(len(EVENTS)))]}
    return ClipSpec(
        video_id=video_id,
        mover_colour=colours[ci[0]], mover_shape=SHAPES[int(rng.integers(len(SHAPES)))],
        direction=direction,
        other_colour=colours[ci[1]], other_shape=SHAPES[int(rng.integers(len(SHAPES)))],
        order=ORDERS[int(rng.integers(len(ORDERS)))],
        start=(float(a[0]), float(a[1])), end=(float(b[0]), float(b[1])),
        other_pos=(float(other[0]), float(other[1])), radius=float(r),
        num_frames=num_frames, size=size, fps=fps, **extra,
    )


def captions_for(spec: ClipSpec, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` distinct, true captions for ``spec`` (templates and verbs shuffled by ``rng``)."""
    templates = _TEMPLATES[spec.order]
    combos = [(t, m, p) for t in range(len(templates)) for m in range(len(_MOVE_VERBS))
              for p in range(len(_APPEAR_VERBS))]
    # Different templates first, then different verbs: a permutation of templates, each with a
    # random verb pair, then the remaining combinations in random order.
    order = list(rng.permutation(len(templates)))
    firsts = [(t, int(rng.integers(len(_MOVE_VERBS))), int(rng.integers(len(_APPEAR_VERBS)))) for t in order]
    rest = [combos[i] for i in rng.permutation(len(combos)) if combos[i] not in firsts]
    out = []
    for t, m, p in (firsts + rest)[:k]:
        out.append(templates[t].format(
            A=f"a {spec.mover_colour} {spec.mover_shape}", M=_MOVE_VERBS[m].format(d=spec.direction),
            B=f"a {spec.other_colour} {spec.other_shape}", P=_APPEAR_VERBS[p]))
    if len(out) < k:
        raise ValueError(f"data.synth.captions_per_clip={k} exceeds the {len(combos)} distinct captions per clip")
    return out


_EVENT_VERBS = {"appears": _APPEAR_VERBS, "disappears": ("disappears", "vanishes")}
_COUNTS = {"appears": ("one shape at first and two at the end", "first one shape, then two shapes"),
           "disappears": ("two shapes at first and one at the end", "first two shapes, then one shape")}
_STATIC_TEMPLATES = ("{X} and {Y} on a {G} background", "on a {G} background, {X} and {Y}",
                     "a {G} background with {X} and {Y}", "{X} and {Y} against a {G} background")
_TEMPORAL_EXTRA = ("{C}, and {A} {M}", "{A} {M} while {B} does not move",
                   "of {A} and {B}, it is the {c} {s} that {M}")


def static_captions(spec: ClipSpec) -> list[str]:
    """Every static caption of ``spec``: what any single frame shows (shapes, colours, size,
    background), never motion or time."""
    size = f"{spec.size_word} " if spec.size_word else ""
    objs = [f"a {size}{spec.mover_colour} {spec.mover_shape}", f"a {size}{spec.other_colour} {spec.other_shape}"]
    return [t.format(X=x, Y=y, G=spec.background) for t in _STATIC_TEMPLATES for x, y in (objs, objs[::-1])]


def temporal_captions(spec: ClipSpec) -> list[str]:
    """Every temporal caption of ``spec`` (``event`` appears or disappears): motion direction and
    event order (the events-mode templates), counts over time, and which of the two objects moves."""
    if spec.event == "stays":
        raise ValueError(f"{spec.video_id}: a clip whose objects stay visible has no event captions")
    a, b = f"a {spec.mover_colour} {spec.mover_shape}", f"a {spec.other_colour} {spec.other_shape}"
    out = []
    for m in _MOVE_VERBS:
        motion = m.format(d=spec.direction)
        for p in _EVENT_VERBS[spec.event]:
            out += [t.format(A=a, M=motion, B=b, P=p) for t in _TEMPLATES[spec.order]]
        for t in _TEMPORAL_EXTRA:
            for c in _COUNTS[spec.event]:
                out.append(t.format(A=a, M=motion, B=b, C=c, c=spec.mover_colour, s=spec.mover_shape))
    return list(dict.fromkeys(out))


def typed_captions(spec: ClipSpec, k: int, rng: np.random.Generator, mode: str) -> list[tuple[str, str]]:
    """``k`` distinct true captions of ``spec`` with their type, ``(caption, "static" | "temporal")``.

    events: :func:`captions_for`, all temporal; static: static only; mixed: temporal and static
    alternate (temporal first), each drawn without replacement in a random order."""
    if mode == "events":
        return [(c, "temporal") for c in captions_for(spec, k, rng)]
    if mode not in CAPTION_MODES:
        raise ValueError(f"data.synth.captions={mode!r}: choose one of {CAPTION_MODES}")
    pools = {"static": [static_captions(spec)[i] for i in rng.permutation(len(_STATIC_TEMPLATES) * 2)]}
    if mode == "mixed":
        temporal = temporal_captions(spec)
        pools["temporal"] = [temporal[i] for i in rng.permutation(len(temporal))]
    kinds = ["static"] * k if mode == "static" else ["temporal" if i % 2 == 0 else "static" for i in range(k)]
    out = []
    for kind in kinds:
        if not pools[kind]:
            raise ValueError(f"data.synth.captions_per_clip={k} exceeds the distinct {kind} captions per clip")
        out.append((pools[kind].pop(0), kind))
    return out


def generate_clip(spec: ClipSpec, *, keyint: int | None = None) -> bytes:
    """Render and encode one clip to MP4 bytes."""
    return encode_mp4(render_frames(spec), spec.fps, keyint=keyint)


@dataclass(kw_only=True)
class SynthResult:
    specs: list[ClipSpec]
    captions: dict[str, list[str]]
    caption_types: dict[str, list[str]]
    """Per clip, the type of each caption in ``captions``: "static" or "temporal"."""
    splits: dict[str, list[str]]
    """``train`` (= the 9k csv), ``train.7k``, ``test`` (JSFusion csv): video ids."""
    files: list[str]
    """Relative paths written."""


def _write(out: str | os.PathLike | BytesWriter, rel: str, data: bytes) -> None:
    if hasattr(out, "write_bytes") and not isinstance(out, Path):
        out.write_bytes(rel, data)
    else:
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def synthesize(out: str | os.PathLike | BytesWriter, *, num_clips: int = 96, test_fraction: float = 0.25,
               captions_per_clip: int = 3, seconds: float = 2.0, fps: int = 12, size: int = 64,
               seed: int = 0, videos_dir: str = "videos", keyframe_interval: int = 0,
               captions: str = "events") -> SynthResult:
    """Write ``num_clips`` MP4 clips to ``<out>/<videos_dir>/video<i>.mp4`` and the MSR-VTT
    annotation files to ``<out>/``. ``out`` is a local directory or any object with
    ``write_bytes(relative_path, data)`` (a ``tvr_platform`` Storage). The keyword names match
    ``tvr_platform.data.config.SynthCfg``, so ``synthesize(out, **asdict(cfg))`` works.
    ``captions``: the caption mode (events | static | mixed, see the module docstring)."""
    if num_clips < 4:
        raise ValueError(f"num_clips={num_clips}: need at least 4 clips")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: must be in (0, 1)")
    if size < 16 or size % 2:
        raise ValueError(f"size={size}: frames must be even-sized and >= 16 px (H.264 yuv420p)")
    num_frames = int(round(seconds * fps))
    if num_frames < 3:
        raise ValueError(f"seconds * fps = {seconds} * {fps}: a clip needs at least 3 frames")
    if captions_per_clip < 1:
        raise ValueError(f"captions_per_clip={captions_per_clip}: must be >= 1")
    if captions not in CAPTION_MODES:
        raise ValueError(f"data.synth.captions={captions!r}: choose one of {CAPTION_MODES}")
    rng = np.random.default_rng(seed)
    ids = [f"video{i}" for i in range(num_clips)]
    specs: list[ClipSpec] = []
    for i, vid in enumerate(ids):
        r = np.random.default_rng([seed, i, 1])
        if captions == "mixed" and i % 2 == 1:     # the twin: time reversal on another background
            twin = specs[i - 1]
            others = [g for g in BACKGROUNDS if g != twin.background]
            specs.append(mirror_spec(twin, video_id=vid, background=others[int(r.integers(len(others)))]))
        else:
            specs.append(sample_spec(r, vid, num_frames=num_frames, size=size, fps=fps, mode=captions))
    typed = {s.video_id: typed_captions(s, captions_per_clip, np.random.default_rng([seed, i, 2]), captions)
             for i, s in enumerate(specs)}
    caption_lists = {v: [c for c, _ in cs] for v, cs in typed.items()}
    n_test = min(max(1, int(round(num_clips * test_fraction))), num_clips - 1)
    if captions == "mixed":                          # twins stay together: split by pair
        groups = [ids[i:i + 2] for i in range(0, num_clips, 2)]
        test_set: set[str] = set()
        for g in rng.permutation(len(groups)):
            if len(test_set) >= n_test:
                break
            test_set |= set(groups[g])
        if len(test_set) == num_clips:
            raise ValueError(f"num_clips={num_clips}, test_fraction={test_fraction}: no twin pair left for training")
        test_ids = [v for v in ids if v in test_set]
        train_ids = [v for v in ids if v not in test_set]
    else:
        perm = rng.permutation(num_clips)
        test_ids = sorted((ids[i] for i in perm[:n_test]), key=lambda v: int(v[5:]))
        train_ids = sorted((ids[i] for i in perm[n_test:]), key=lambda v: int(v[5:]))
    # JSON split labels of training clips, mirroring the release: mostly train, some validate/test.
    json_split = {v: "test" for v in test_ids}
    for j, v in enumerate(train_ids):
        json_split[v] = "test" if j % 8 == 7 else "validate" if j % 16 == 3 else "train"
    train_7k = [v for v in train_ids if json_split[v] != "test"]

    files: list[str] = []
    for spec in specs:
        rel = f"{videos_dir.strip('/')}/{spec.video_id}.mp4"
        _write(out, rel, generate_clip(spec, keyint=keyframe_interval or None))
        files.append(rel)
    data = {
        "info": {"year": "2016", "version": "1.0", "description": f"tvr synthetic shapes, seed {seed}",
                 "contributor": "tvr", "data_created": "synthetic"},
        "videos": [{"category": int(np.random.default_rng([seed, i, 3]).integers(20)),
                    "url": f"synthetic://shapes/{seed}/{s.video_id}", "video_id": s.video_id,
                    "start time": 0.0, "end time": float(num_frames / fps),
                    "split": json_split[s.video_id], "id": i} for i, s in enumerate(specs)],
        "sentences": [],
    }
    sen_id = 0
    for s in specs:
        for c in caption_lists[s.video_id]:
            data["sentences"].append({"caption": c, "video_id": s.video_id, "sen_id": sen_id})
            sen_id += 1
    payloads = {
        "MSRVTT_data.json": json.dumps(data).encode("utf-8"),
        "MSRVTT_train.9k.csv": _csv_bytes(["video_id"], [[v] for v in train_ids]),
        "MSRVTT_train.7k.csv": _csv_bytes(["video_id"], [[v] for v in train_7k]),
        "MSRVTT_JSFUSION_test.csv": _csv_bytes(
            ["key", "vid_key", "video_id", "sentence"],
            [[f"ret{j}", f"msr{v[5:]}", v, caption_lists[v][0]] for j, v in enumerate(test_ids)]),
        "synth_specs.json": json.dumps([asdict(s) for s in specs]).encode("utf-8"),
        CAPTION_TYPES_FILE: json.dumps({v: [t for _, t in cs] for v, cs in typed.items()}).encode("utf-8"),
    }
    for rel, blob in payloads.items():
        _write(out, rel, blob)
        files.append(rel)
    return SynthResult(specs=specs, captions=caption_lists,
                       caption_types={v: [t for _, t in cs] for v, cs in typed.items()},
                       splits={"train": train_ids, "train.7k": train_7k, "test": test_ids}, files=files)
