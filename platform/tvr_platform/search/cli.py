"""``tvr index build`` and ``tvr search``.

    tvr index build models:/name@alias [overrides] --videos <storage uri> [--index URI]
    tvr search "a red circle moves left" [overrides] --top-k 10 [--index URI] [--candidates N]

(``key.sub=value`` overrides go right after the positional arguments, before the ``--`` options:
argparse cannot take positionals after options in a subcommand.)

``tvr index build`` records the index it wrote in ``<run.work_dir>/index/latest.json``, so a
following ``tvr search`` needs no ``--index``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _latest_file(overrides: list[str]) -> Path:
    from tvr_platform.config import load_job

    return load_job(None, overrides).work_dir / "index" / "latest.json"


def cmd_index_build(args: argparse.Namespace) -> int:
    from tvr_platform.search.index import build_index

    t0 = time.time()
    summary = build_index(args.model, args.videos, overrides=args.overrides, index_uri=args.index,
                          batch_size=args.batch_size, concurrency=args.concurrency)
    latest = _latest_file(args.overrides)
    latest.parent.mkdir(parents=True, exist_ok=True)
    latest.write_text(json.dumps({"index": summary["index"], "model": args.model}))
    print(f"[tvr] index {summary['index']}: {summary['videos']} clips, {summary['already_indexed']} already "
          f"indexed, {summary['embedded']} embedded now ({time.time() - t0:.1f}s)")
    return 0


def open_searcher(index_uri: str | None, overrides: list[str]):
    """The Searcher for ``index_uri`` (default: the last index built from this work dir)."""
    from tvr_platform.config import load_job
    from tvr_platform.registry import build_from_artifacts, download_model
    from tvr_platform.search import Searcher, load_index

    job = load_job(None, overrides)
    if index_uri is None:
        latest = _latest_file(overrides)
        if not latest.exists():
            raise FileNotFoundError(f"{latest}: no index built from this work dir; run `tvr index build` "
                                    "first or pass --index URI")
        index_uri = json.loads(latest.read_text())["index"]
    index = load_index(index_uri, endpoint_url=job.storage.endpoint_url, region=job.storage.region)
    tracking = index.meta.get("tracking_uri") or job.tracking_uri
    _, method = build_from_artifacts(*download_model(index.meta["model_version"], tracking))
    return Searcher(method, index)


def cmd_search(args: argparse.Namespace) -> int:
    searcher = open_searcher(args.index, args.overrides)
    t0 = time.perf_counter()
    hits = searcher.search(args.query, args.top_k, args.candidates)
    ms = 1000 * (time.perf_counter() - t0)
    mode = "exhaustive" if args.candidates is None else f"two-stage, {args.candidates} candidates"
    captions = clip_captions(searcher.index.meta, args.overrides)
    rows = [{"rank": h.rank, "score": round(float(h.score), 6), "video_id": h.video_id,
             "caption": captions.get(h.video_id)} for h in hits]
    if args.json:
        print(json.dumps({"query": args.query, "clips": len(searcher.index), "method": searcher.index.meta["method"],
                          "mode": mode, "ms": round(ms, 1), "hits": rows}))
        return 0
    print(f"[tvr] {len(searcher.index)} clips, {searcher.index.meta['method']} ({mode}), {ms:.1f} ms")
    width = max([len(r["video_id"]) for r in rows] or [0])
    for r in rows:
        caption = f"  {r['caption']}" if r["caption"] else ""
        print(f"{r['rank']:>3}  {r['score']:8.4f}  {r['video_id']:<{width}}{caption}")
    return 0


def clip_captions(meta: dict, overrides: list[str]) -> dict[str, str]:
    """video file -> its first caption, when the indexed folder is the videos folder of a dataset
    the model's data.format can read (its parent holds the annotations); {} otherwise."""
    from tvr.data.annotations import AnnotationError, read_manifest
    from tvr_platform.config import ConfigError, load_job
    from tvr_platform.storage import StorageError, open_storage

    try:
        job = load_job(None, [f"data.format={load_job_format(meta)}", *overrides])
        root = meta["videos"].rstrip("/").rsplit("/", 1)[0]
        source = open_storage(root, endpoint_url=job.storage.endpoint_url, region=job.storage.region)
    except (ConfigError, StorageError, KeyError, ValueError):
        return {}
    out: dict[str, str] = {}
    for split in (job.data.train_split, *filter(None, [job.data.val_split]), job.data.test_split):
        try:
            m = read_manifest(source, job.data.format, split)
        except (AnnotationError, StorageError, OSError):
            continue
        for c, v in zip(m.captions, m.caption_video):
            out.setdefault(m.video_files[v], c)
    return out


def load_job_format(meta: dict) -> str:
    """The data.format of the job that built the index (recorded in its meta)."""
    import yaml

    fmt = ((yaml.safe_load(meta.get("job") or "") or {}).get("data") or {}).get("format", "msrvtt")
    # read from index storage and passed on as an override: a name, never an interpolation
    return fmt if isinstance(fmt, str) and fmt.isidentifier() else "msrvtt"


def add_subcommands(sub) -> None:
    index = sub.add_parser("index", help="video feature indexes for search").add_subparsers(
        dest="index_command", required=True)
    p = index.add_parser("build", help="embed a video folder with a registered model (Ray Data, resumable)")
    p.add_argument("model", help="models:/name@alias or models:/name/version")
    p.add_argument("--videos", required=True, help="storage URI of the video folder (local dir or s3://)")
    p.add_argument("--index", help="index URI (default: <videos>/../tvr-index/<model>)")
    p.add_argument("--batch-size", type=int, default=32, help="clips per inference batch and shard")
    p.add_argument("--concurrency", type=int, default=1, help="embedding actors")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (run.work_dir, storage.*)")
    p.set_defaults(func=cmd_index_build)

    p = sub.add_parser("search", help="text -> video search over an index")
    p.add_argument("query", help="the text query")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--index", help="index URI (default: the last one `tvr index build` wrote)")
    p.add_argument("--candidates", type=int, help="two-stage: rerank this many coarse candidates "
                   "(default: exhaustive)")
    p.add_argument("--json", action="store_true", help="print the hits as one JSON object (rank, score, "
                   "video_id, caption)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (run.work_dir, storage.*)")
    p.set_defaults(func=cmd_search)
