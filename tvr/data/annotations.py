"""Readers of published text-video retrieval annotation files -> one plain :class:`Manifest`.

A manifest is the list of videos of one split and every caption of them:

    video_ids[i]      the dataset's id of video i               e.g. "video7020"
    video_files[i]    its file, relative to the videos folder   e.g. "video7020.mp4"
    captions[j]       caption j                                 e.g. "a woman creating a fondant baby"
    caption_video[j]  index into video_ids of caption j's video (captions of a video are contiguous,
                      in file order; for MSR-VTT test the JSFusion sentence comes first)

Readers take a *source*: anything with ``read_bytes(relative_path) -> bytes`` and
``exists(relative_path) -> bool`` (a local :class:`LocalSource`, or ``tvr_platform``'s Storage for
S3). Field and file names are those of the original releases (see each reader's docstring).

Bad annotations never stop a job: an empty caption, or one that is not valid UTF-8, is dropped;
a video left without any caption is dropped; a repeated video id keeps its first occurrence.
Each drop is recorded in ``Manifest.quarantine`` as ``{"uri": <file>#<id>, "reason": ...}``.
A missing or malformed annotation file (wrong columns, a record without a required field) is
an :class:`AnnotationError` naming the file and the field.

Formats (``data.format``): msrvtt, msvd, didemo, lsmdc, charades, vatex, activitynet. DiDeMo and
ActivityNet Captions are read for *paragraph-to-video* retrieval, as CLIP4Clip does: the sentences
of a video, in file order, are joined into one caption.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class AnnotationError(ValueError):
    """An annotation file is missing or malformed; the message names the file and what to do."""


class Source(Protocol):
    def read_bytes(self, path: str) -> bytes: ...

    def exists(self, path: str) -> bool: ...


class LocalSource:
    """A local directory as a :class:`Source`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def read_bytes(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def exists(self, path: str) -> bool:
        return (self.root / path).exists()

    def url(self, path: str = "") -> str:
        return str(self.root / path)


@dataclass(kw_only=True)
class Manifest:
    dataset: str
    split: str
    video_ids: list[str]
    video_files: list[str]
    captions: list[str]
    caption_video: list[int]
    segments: list[tuple[float, float] | None] | None = None
    """Optional (start, end) seconds per video, for datasets whose clips are parts of a file."""
    quarantine: list[dict[str, str]] = field(default_factory=list)
    """Records of what was dropped while reading: {"uri", "reason"}."""

    def __post_init__(self) -> None:
        n = len(self.video_ids)
        if len(self.video_files) != n or (self.segments is not None and len(self.segments) != n):
            raise ValueError("Manifest: video_ids, video_files and segments must have the same length")
        if len(self.captions) != len(self.caption_video):
            raise ValueError("Manifest: captions and caption_video must have the same length")
        if any(not 0 <= v < n for v in self.caption_video):
            raise ValueError("Manifest: caption_video holds an index outside video_ids")

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def captions_per_video(self) -> list[list[int]]:
        """For each video, the indices of its captions (in manifest order)."""
        out: list[list[int]] = [[] for _ in self.video_ids]
        for j, v in enumerate(self.caption_video):
            out[v].append(j)
        return out

    @property
    def max_captions(self) -> int:
        return max((len(c) for c in self.captions_per_video()), default=0)

    def first_captions(self) -> tuple[list[str], list[int]]:
        """One caption per video (the first): (captions, caption_video)."""
        per = self.captions_per_video()
        idx = [c[0] for c in per if c]
        return [self.captions[j] for j in idx], [self.caption_video[j] for j in idx]

    def head(self, n: int) -> Manifest:
        """The first ``n`` videos and their captions (for smoke runs)."""
        return self.subset(range(min(n, self.num_videos)))

    def subset(self, indices: Iterable[int], *, quarantine: bool = True) -> Manifest:
        """The videos ``indices`` (in that order) with every caption of each: a video's captions
        never end up on two sides. Same ``split`` name (its frame cache serves the subset);
        ``quarantine``: keep the read-time records (give them to one subset only)."""
        keep = list(indices)
        new_index = {old: i for i, old in enumerate(keep)}
        caps = sorted(((new_index[v], j) for j, v in enumerate(self.caption_video) if v in new_index))
        return Manifest(dataset=self.dataset, split=self.split, video_ids=[self.video_ids[i] for i in keep],
                        video_files=[self.video_files[i] for i in keep],
                        captions=[self.captions[j] for _, j in caps], caption_video=[v for v, _ in caps],
                        segments=None if self.segments is None else [self.segments[i] for i in keep],
                        quarantine=list(self.quarantine) if quarantine else [])


# -- helpers ------------------------------------------------------------------------------------

def _text(source: Source, path: str) -> str:
    """File contents as text; bytes that are not UTF-8 become lone surrogates (found later)."""
    if not source.exists(path):
        where = source.url(path) if hasattr(source, "url") else path
        raise AnnotationError(f"{where}: annotation file not found; check data.root and data.format")
    data = source.read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _json(source: Source, path: str) -> Any:
    try:
        return json.loads(_text(source, path))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); "
                              "re-download the annotation file") from None


def _jsonl(source: Source, path: str) -> list[Any]:
    out = []
    for i, line in enumerate(_text(source, path).splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}: line {i + 1} is not valid JSON ({err.msg})") from None
    return out


def _csv(source: Source, path: str, required: Iterable[str], delimiter: str = ",") -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(_text(source, path)), delimiter=delimiter)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {missing} (header {header[:8]}); "
                              "expected the published format")
    return [dict(zip(header, row)) for row in reader if row]


def _need(record: dict, key: str, path: str) -> Any:
    if key not in record:
        raise AnnotationError(f"{path}: a record lacks the field {key!r} (has {sorted(record)[:8]}); "
                              "is data.format right?")
    return record[key]


def caption_problem(caption: Any) -> str | None:
    """Why a caption is unusable (None if fine)."""
    if not isinstance(caption, str):
        return f"caption is {type(caption).__name__}, not text"
    if not caption.strip():
        return "empty caption"
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in caption) or "\ufffd" in caption:
        return "caption is not valid UTF-8"
    return None


class _Builder:
    """Collects (video, captions) in order, applying the documented drop rules."""

    def __init__(self, dataset: str, split: str, file_of: Callable[[str], str], *, paragraph: bool = False):
        self.dataset, self.split, self.file_of = dataset, split, file_of
        self.paragraph = paragraph
        self.order: list[str] = []
        self.caps: dict[str, list[str]] = {}
        self.segments: dict[str, tuple[float, float] | None] = {}
        self.files: dict[str, str] = {}
        self.quarantine: list[dict[str, str]] = []

    def video(self, vid: str, *, file: str | None = None, segment: tuple[float, float] | None = None,
              where: str = "", listed: bool = True) -> None:
        """Add ``vid`` once. ``listed``: the call comes from a listing of videos (a split list, a
        one-row-per-video file), where a repeated id is a duplicate: reported, its entries merged
        (captions of both kept; the first file wins). Per-caption records pass ``listed=False``."""
        vid = str(vid)
        if vid in self.caps:
            if listed:
                other = file or self.file_of(vid)
                self.quarantine.append({
                    "uri": f"{where or self.dataset}#{vid}", "action": "merged",
                    "reason": "duplicate video id in the listing: its entries are merged into one video"
                              + (f" (file {other!r} ignored, {self.files[vid]!r} kept)" if other != self.files[vid] else "")})
            return
        self.order.append(vid)
        self.caps[vid] = []
        self.files[vid] = file or self.file_of(vid)
        self.segments[vid] = segment

    def caption(self, vid: str, caption: Any, where: str) -> None:
        vid = str(vid)
        if vid not in self.caps:
            return
        problem = caption_problem(caption)
        if problem:
            self.quarantine.append({"uri": f"{where}#{vid}", "reason": problem})
            return
        caption = " ".join(caption.split())
        if self.paragraph or caption not in self.caps[vid]:
            self.caps[vid].append(caption)

    def build(self, where: str) -> Manifest:
        if self.paragraph:                                   # one caption: the sentences joined
            self.caps = {v: [" ".join(c)] if c else [] for v, c in self.caps.items()}
        ids = []
        for v in self.order:
            if self.caps[v]:
                ids.append(v)
            else:
                self.quarantine.append({"uri": f"{where}#{v}", "reason": "video has no usable caption; dropped"})
        if not ids:
            raise AnnotationError(f"{where}: split {self.split!r} of {self.dataset} has no video with a caption")
        captions, caption_video = [], []
        for i, v in enumerate(ids):
            captions += self.caps[v]
            caption_video += [i] * len(self.caps[v])
        segs = [self.segments[v] for v in ids]
        return Manifest(dataset=self.dataset, split=self.split, video_ids=ids,
                        video_files=[self.files[v] for v in ids], captions=captions,
                        caption_video=caption_video,
                        segments=segs if any(s is not None for s in segs) else None,
                        quarantine=self.quarantine)


# -- MSR-VTT ------------------------------------------------------------------------------------

MSRVTT_SPLITS = ("train", "train.9k", "train.7k", "val", "test", "test.full")


def read_msrvtt(source: Source, split: str) -> Manifest:
    """MSR-VTT (Xu et al. 2016) as CLIP4Clip / X-Pool read it.

    Files: ``MSRVTT_data.json`` ({"videos": [{"video_id", "split", ...}], "sentences": [{"caption",
    "video_id", "sen_id"}]}), ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv`` (column
    ``video_id``), ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``). Videos are
    ``<video_id>.mp4``.

    Splits: ``train`` = ``train.9k`` (the 9k csv; if it is absent, JSON split "train"),
    ``train.7k``; ``val`` (JSON "validate"); ``test`` = JSFusion 1k-A: the csv sentence first, then
    (when MSRVTT_data.json is there) the video's other captions, so eval_captions='first' is exactly
    the 1k-A protocol; ``test.full`` (JSON "test", 2,990 videos in the release).
    """
    if split not in MSRVTT_SPLITS:
        raise AnnotationError(f"data split {split!r} is not an MSR-VTT split; choose one of {MSRVTT_SPLITS}")
    b = _Builder("msrvtt", split, lambda v: f"{v}.mp4")
    data_path = "MSRVTT_data.json"
    data = _json(source, data_path) if (split != "test" or source.exists(data_path)) else None
    if data is not None and (not isinstance(data, dict) or "sentences" not in data):
        raise AnnotationError(f"{data_path}: expected an object with 'videos' and 'sentences'")
    where = data_path
    if split == "test":
        where = "MSRVTT_JSFUSION_test.csv"
        for row in _csv(source, where, ["video_id", "sentence"]):
            b.video(row["video_id"])
            b.caption(row["video_id"], row["sentence"], where)
    elif split in ("train", "train.9k", "train.7k"):
        csv_name = "MSRVTT_train.7k.csv" if split == "train.7k" else "MSRVTT_train.9k.csv"
        if split == "train" and not source.exists(csv_name):
            for v in data.get("videos", []):
                if _need(v, "split", data_path) == "train":
                    b.video(_need(v, "video_id", data_path))
        else:
            for row in _csv(source, csv_name, ["video_id"]):
                b.video(row["video_id"])
            where = csv_name
    else:
        wanted = "validate" if split == "val" else "test"
        for v in _need(data, "videos", data_path):
            if _need(v, "split", data_path) == wanted:
                b.video(_need(v, "video_id", data_path))
    if data is not None:
        for s in data["sentences"]:
            b.caption(_need(s, "video_id", data_path), _need(s, "caption", data_path), data_path)
    return b.build(where)


def _check_split(dataset: str, split: str, splits: Iterable[str]) -> None:
    splits = tuple(splits)
    if split not in splits:
        raise AnnotationError(f"data split {split!r} is not a {dataset} split; choose one of {splits}")


def _lines(source: Source, path: str) -> list[str]:
    return [line.strip() for line in _text(source, path).splitlines() if line.strip()]


def _list_of(data: Any, path: str, what: str) -> list:
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of {what}, found {type(data).__name__}; "
                              "is data.format right?")
    return data


def _dict_of(data: Any, path: str, what: str) -> dict:
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object of {what}, found {type(data).__name__}; "
                              "is data.format right?")
    return data


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings and numbers only: never imports or calls anything."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load the Python object {module}.{name}")


def _plain_pickle(source: Source, path: str) -> Any:
    if not source.exists(path):
        raise AnnotationError(f"{path}: annotation file not found; check data.root and data.format")
    try:
        return _PlainUnpickler(io.BytesIO(source.read_bytes(path))).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise AnnotationError(f"{path}: not a pickle of plain captions ({err}); re-download it") from None


# -- MSVD ----------------------------------------------------------------------------------------

def read_msvd(source: Source, split: str) -> Manifest:
    """MSVD (Chen & Dolan 2011) in the collaborative-experts / CLIP4Clip package.

    Files: ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt`` (one video id per line, e.g.
    ``-4wsuPCjDBc_5_15``) and ``raw-captions.pkl`` (a pickled dict ``video id -> [caption tokens,
    ...]``, each caption a list of words; joined with spaces). Videos are ``<video id>.avi``.
    The pickle is loaded with an unpickler that accepts plain containers only.
    """
    _check_split("MSVD", split, ("train", "val", "test"))
    list_path, caps_path = f"{split}_list.txt", "raw-captions.pkl"
    ids = _lines(source, list_path)
    captions = _dict_of(_plain_pickle(source, caps_path), caps_path, "video id -> captions")
    b = _Builder("msvd", split, lambda v: f"{v}.avi")
    for vid in ids:
        b.video(vid)
        for cap in captions.get(vid, []):
            if isinstance(cap, list | tuple):
                cap = " ".join(str(w) for w in cap) if all(isinstance(w, str) for w in cap) else None
            b.caption(vid, cap, caps_path)
    return b.build(list_path)


# -- DiDeMo --------------------------------------------------------------------------------------

DIDEMO_SECONDS = 30.0
"""DiDeMo annotators saw at most the first 30 s (six 5-second chunks) of each video."""


def read_didemo(source: Source, split: str) -> Manifest:
    """DiDeMo (Hendricks et al. 2017), paragraph-to-video retrieval as in CLIP4Clip.

    Files: ``{train,val,test}_data.json`` (the LocalizingMoments release: a list of
    ``{"annotation_id", "description", "video", "times", "dl_link", "num_segments"}``) and,
    optionally, ``{split}_list.txt`` (the video files of the split, one per line); without the list
    every video of the JSON is used. The caption of a video is all its descriptions joined in file
    order; its segment is the annotated span ``[0, 30) s``. ``video`` is the file name (with its
    extension, e.g. ``12090392@N02_13482799053_87ef417396.mov``).
    """
    _check_split("DiDeMo", split, ("train", "val", "test"))
    data_path, list_path = f"{split}_data.json", f"{split}_list.txt"
    records = _list_of(_json(source, data_path), data_path, "moment annotations")
    b = _Builder("didemo", split, lambda v: v, paragraph=True)
    if source.exists(list_path):
        for vid in _lines(source, list_path):
            b.video(vid, segment=(0.0, DIDEMO_SECONDS))
    for r in records:
        vid = str(_need(r, "video", data_path))
        if not source.exists(list_path):
            b.video(vid, segment=(0.0, DIDEMO_SECONDS), listed=False)   # one record per moment
        b.caption(vid, _need(r, "description", data_path), data_path)
    return b.build(data_path)


# -- LSMDC ---------------------------------------------------------------------------------------

LSMDC_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
               "test": "LSMDC16_challenge_1000_publictect.csv"}
LSMDC_FIELDS = ("clip_id", "start_aligned", "end_aligned", "start_extracted", "end_extracted", "sentence")


def read_lsmdc(source: Source, split: str) -> Manifest:
    """LSMDC 2016 (Rohrbach et al.), as CLIP4Clip reads it.

    Files: ``LSMDC16_annos_training.csv`` (train), ``LSMDC16_annos_val.csv`` (val),
    ``LSMDC16_challenge_1000_publictect.csv`` (test, the 1,000-clip retrieval test): tab-separated,
    no header, six fields ``<CLIP_ID> <START_ALIGNED> <END_ALIGNED> <START_EXTRACTED>
    <END_EXTRACTED> <SENTENCE>``. A clip id may repeat with several sentences. Videos are
    ``<movie>/<clip id>.avi`` where ``<movie>`` is the clip id up to its last ``_`` (the release's
    folder per movie, e.g. ``0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi``).
    """
    _check_split("LSMDC", split, LSMDC_FILES)
    path = LSMDC_FILES[split]
    b = _Builder("lsmdc", split, lambda v: f"{v.rsplit('_', 1)[0]}/{v}.avi")
    for i, line in enumerate(_text(source, path).splitlines()):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != len(LSMDC_FIELDS):
            raise AnnotationError(f"{path}: line {i + 1} has {len(fields)} tab-separated field(s), expected "
                                  f"{len(LSMDC_FIELDS)} {LSMDC_FIELDS}; is data.format right?")
        b.video(fields[0])
        b.caption(fields[0], fields[5], path)
    return b.build(path)


# -- Charades ------------------------------------------------------------------------------------

def read_charades(source: Source, split: str) -> Manifest:
    """Charades v1 (Sigurdsson et al. 2016), the release CSVs.

    Files: ``Charades_v1_train.csv`` / ``Charades_v1_test.csv`` with columns ``id, subject, scene,
    quality, relevance, verified, script, objects, descriptions, actions, length``. Captions of a
    video: its ``script`` first (so ``eval_captions='first'`` is the script protocol), then each
    sentence of ``descriptions`` (``;``-separated). Videos are ``<id>.mp4``.
    """
    _check_split("Charades", split, ("train", "test"))
    path = f"Charades_v1_{split}.csv"
    b = _Builder("charades", split, lambda v: f"{v}.mp4")
    for row in _csv(source, path, ["id", "script", "descriptions"]):
        b.video(row["id"])
        b.caption(row["id"], row["script"], path)
        for d in row["descriptions"].split(";"):
            if d.strip():
                b.caption(row["id"], d, path)
    return b.build(path)


# -- VATEX ---------------------------------------------------------------------------------------

VATEX_FILES = {"train": "vatex_training_v1.0.json", "val": "vatex_validation_v1.0.json",
               "test": "vatex_public_test_english_v1.1.json"}


def read_vatex(source: Source, split: str) -> Manifest:
    """VATEX (Wang et al. 2019), English captions of the release JSONs.

    Files: ``vatex_training_v1.0.json`` (train), ``vatex_validation_v1.0.json`` (val),
    ``vatex_public_test_english_v1.1.json`` (test): lists of ``{"videoID", "enCap": [10 captions],
    "chCap": [...]}`` (``videoID`` = ``<youtube id>_<start>_<end>``). When ``{split}_list.txt`` is
    present (the retrieval splits of HGR / CLIP4Clip follow-ups: 25,991 / 1,500 / 1,500 ids, the
    val and test ones taken from the validation release), the split is that list and captions come
    from every release JSON present. Videos are ``<videoID>.mp4``.
    """
    _check_split("VATEX", split, VATEX_FILES)
    list_path = f"{split}_list.txt"
    b = _Builder("vatex", split, lambda v: f"{v}.mp4")
    if source.exists(list_path):
        for vid in _lines(source, list_path):
            b.video(vid)
        paths = [p for p in VATEX_FILES.values() if source.exists(p)]
        if not paths:
            raise AnnotationError(f"{list_path}: none of the VATEX release files {list(VATEX_FILES.values())} "
                                  "is next to it; they hold the captions")
    else:
        paths = [VATEX_FILES[split]]
    for path in paths:
        for r in _list_of(_json(source, path), path, "videos"):
            vid = str(_need(r, "videoID", path))
            if not source.exists(list_path):
                b.video(vid, listed=False)                               # the release files may overlap
            caps = _need(r, "enCap", path)
            for cap in caps if isinstance(caps, list) else [caps]:
                b.caption(vid, cap, path)
    return b.build(list_path if source.exists(list_path) else paths[0])


# -- ActivityNet Captions -----------------------------------------------------------------------

ACTIVITYNET_FILES = {"train": ("train.json", "train_ids.json"), "val": ("val_1.json", "val_ids.json"),
                     "val_2": ("val_2.json", "val_ids.json")}


def read_activitynet(source: Source, split: str) -> Manifest:
    """ActivityNet Captions (Krishna et al. 2017), paragraph-to-video retrieval as in CLIP4Clip.

    Files: ``train.json`` (train), ``val_1.json`` (val, the usual test set), ``val_2.json``
    (val_2): objects ``{"v_<youtube id>": {"duration", "timestamps", "sentences"}}``; optionally
    ``train_ids.json`` / ``val_ids.json`` (lists of ``v_`` ids) restricting the split. The caption of
    a video is its sentences joined in order; the clip is the whole video. Videos are
    ``<youtube id>.mp4`` (the ``v_`` prefix removed, as CLIP4Clip does).
    """
    _check_split("ActivityNet Captions", split, ACTIVITYNET_FILES)
    path, ids_path = ACTIVITYNET_FILES[split]
    data = _dict_of(_json(source, path), path, "v_<id> -> {duration, timestamps, sentences}")
    b = _Builder("activitynet", split, lambda v: f"{v[2:] if v.startswith('v_') else v}.mp4", paragraph=True)
    ids = _list_of(_json(source, ids_path), ids_path, "video ids") if source.exists(ids_path) else list(data)
    for vid in ids:
        b.video(str(vid))
    for vid, rec in data.items():
        sentences = _need(_dict_of(rec, path, "annotation fields"), "sentences", path)
        for sent in sentences if isinstance(sentences, list) else [sentences]:
            b.caption(vid, sent, path)
    return b.build(path)


READERS: dict[str, Callable[[Source, str], Manifest]] = {
    "msrvtt": read_msrvtt,
    "msvd": read_msvd,
    "didemo": read_didemo,
    "lsmdc": read_lsmdc,
    "charades": read_charades,
    "vatex": read_vatex,
    "activitynet": read_activitynet,
}


def read_manifest(source: Source | str | Path, fmt: str, split: str) -> Manifest:
    """Read split ``split`` of a dataset in format ``fmt`` from ``source`` (a dir or a Source)."""
    if isinstance(source, str | Path):
        source = LocalSource(source)
    if fmt not in READERS:
        raise AnnotationError(f"data.format={fmt!r} has no reader; choose one of {sorted(READERS)}")
    return READERS[fmt](source, split)
