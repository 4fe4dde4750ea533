"""``tvr data prepare <spec> [overrides] [--split S ...]``: write the frame cache of a job's data.
``tvr data check <folder> [--format F] [--split S ...] [overrides]``: validate a dataset folder.

Decodes every clip of the job's train and test splits (or the ``--split`` ones) once, with the
evaluation sampling, and writes them as sharded Parquet next to the dataset
(:mod:`tvr_platform.data.cache`). Train / evaluate with ``data.frames=cache`` (or ``auto``).
"""

from __future__ import annotations

import argparse
import json


def cmd_prepare(args: argparse.Namespace) -> int:
    from tvr_platform.config import load_job
    from tvr_platform.data.cache import cache_uri, prepare_cache
    from tvr_platform.train.trainer import init_ray

    job = load_job(args.spec, args.overrides)
    init_ray(job)
    metas = prepare_cache(job, args.split or None)
    for split, meta in metas.items():
        print(f"[tvr] {split}: {meta['num_valid']}/{meta['num_videos']} clips decodable, "
              f"{meta['format']} frames (T={meta['num_frames']}, S={meta['size']}) -> {cache_uri(job, split)}")
    print(json.dumps({s: m["num_videos"] for s, m in metas.items()}))
    return 0


DEFAULT_CHECK_SPLITS = {"msrvtt": ("train", "train.7k", "test"), "msvd": ("train", "val", "test"),
                        "didemo": ("train", "val", "test"), "lsmdc": ("train", "val", "test"),
                        "charades": ("train", "test"), "vatex": ("train", "val", "test"),
                        "activitynet": ("train", "val")}


def check_dataset(root: str, fmt: str, splits: list[str] | None = None, overrides: list[str] = ()
                  ) -> list[dict]:
    """Read every split's annotations from ``root`` (local or s3://) and look for its videos:
    one record per split ``{"split", "videos", "captions", "found", "missing", "dropped"}``, or
    ``{"split", "error"}`` when its annotation files are missing or malformed."""
    from tvr.data.annotations import AnnotationError, read_manifest
    from tvr_platform.config import join_uri, load_job
    from tvr_platform.data.pipeline import videos_uri
    from tvr_platform.storage import StorageError, storage_for

    job = load_job(None, [f"data.root={root}", f"data.format={fmt}", *overrides])
    source = storage_for(job, job.dataset_uri).check()
    videos = storage_for(job, videos_uri(job))
    try:
        present = set(videos.list())
    except StorageError:
        present = set()
    out = []
    for split in splits or DEFAULT_CHECK_SPLITS[fmt]:
        try:
            m = read_manifest(source, fmt, split)
        except AnnotationError as err:
            out.append({"split": split, "error": str(err).splitlines()[0]})
            continue
        found = sum(f in present for f in m.video_files)
        out.append({"split": split, "videos": len(m.video_ids), "captions": len(m.captions), "found": found,
                    "missing": len(m.video_ids) - found, "dropped": len(m.quarantine),
                    "videos_uri": join_uri(videos_uri(job), "")})
    return out


def cmd_check(args: argparse.Namespace) -> int:
    records = check_dataset(args.folder, args.format, args.split, args.overrides)
    ok = True
    for r in records:
        if "error" in r:
            print(f"[tvr] {r['split']:<9} not readable: {r['error']}")
            ok = ok and args.split is None
            continue
        print(f"[tvr] {r['split']:<9} {r['videos']:>7,} clips  {r['captions']:>8,} captions  "
              f"{r['found']:>7,} video files found under {r['videos_uri']}"
              + (f"  ({r['dropped']} annotation records dropped)" if r["dropped"] else ""))
        ok = ok and r["missing"] == 0
    if args.json:
        print(json.dumps(records))
    readable = [r for r in records if "error" not in r]
    if not readable:
        print("[tvr] no split readable: check the folder and --format (docs/data.md)")
        return 1
    if not ok:
        print("[tvr] some clips have no video file: put <video_id>.mp4 files in the videos folder (docs/data.md)")
    return 0 if ok else 1


def add_prepare(data_subparsers) -> None:
    """Register ``prepare`` and ``check`` under the ``tvr data`` group."""
    p = data_subparsers.add_parser("check", help="validate a dataset folder: annotations, splits, video files")
    p.add_argument("folder", help="dataset folder (local or s3://): the annotation files + videos/")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (data.videos=..., storage.*)")
    p.add_argument("--format", default="msrvtt", choices=sorted(DEFAULT_CHECK_SPLITS), help="data.format")
    p.add_argument("--split", action="append", metavar="S", help="split to check (repeatable; default: the "
                   "format's usual splits, unreadable ones reported)")
    p.add_argument("--json", action="store_true", help="also print the counts as one JSON line")
    p.set_defaults(func=cmd_check)

    p = data_subparsers.add_parser("prepare", help="decode once: write sampled frames as sharded Parquet")
    p.add_argument("spec", nargs="?", help="YAML job spec (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--split", action="append", metavar="S", help="split to prepare (repeatable); "
                   "default: data.train_split and data.test_split")
    p.set_defaults(func=cmd_prepare)
