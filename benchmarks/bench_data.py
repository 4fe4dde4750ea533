"""Data-path throughput on the same generated clips: decode ceiling, research baseline, tvr's Ray Data.

Run on demand (not a test; it starts Ray, so on a shared machine take the Ray lock):

    flock /tmp/tvr-ray.lock .venv/bin/python benchmarks/bench_data.py
    .venv/bin/python benchmarks/bench_data.py --clips 32 --seconds 8 --fps 25 --frames 12 --size 224

Modes, each over every clip once (the evaluation sampling: T segment middles, resized/cropped
to S x S, CLIP-normalised float32 (T, 3, S, S) per clip), timed on a second pass after a warm-up
pass so that process / actor start-up is not counted:

- (a) ``pyav-all-frames``: one process decodes *every* frame of each clip with PyAV and converts
  it to RGB -- the decode ceiling of reading whole clips (no resize, no sampling);
- (b) ``torch-dataloader``: the usual research baseline -- a ``torch.utils.data.DataLoader`` with
  ``--workers`` worker processes over local files; each item decodes every frame to RGB (as
  CLIP4Clip's OpenCV reader does), keeps the T sampled ones, resizes (bicubic) + centre-crops them
  with PIL and normalises;
- (c) ``tvr-ray-local``: ``tvr_platform.data.pipeline.video_dataset`` over the local directory
  (Ray Data, ``--workers`` parallel decode tasks, keyframe-aware sampled decoding);
- (d) ``tvr-ray-s3``: the same pipeline reading the clips from a local S3 server (moto, HTTP on
  127.0.0.1) through pyarrow's S3 filesystem.

Reported: clips/s, sampled frames/s (T per clip; for (a) the T a consumer would keep) and sampled
frames/s per core (cores = processes doing the work: 1 for (a), ``--workers`` for (b)-(d); the
Ray cluster gets ``--workers`` CPUs). The moto server of (d) runs in the driver process and takes
CPU from the same cores, so (d) is a pessimistic stand-in for a remote object store.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np


def make_clips(root: Path, clips: int, seconds: float, fps: int, size: int) -> list[str]:
    from tvr.data.synthetic import synthesize

    res = synthesize(root, num_clips=clips, seconds=seconds, fps=fps, size=size, seed=0)
    return [f"{s.video_id}.mp4" for s in res.specs]


# -- (a) ------------------------------------------------------------------------------------------

def bench_pyav_all(paths: list[Path]) -> int:
    import av

    n = 0
    for p in paths:
        with av.open(str(p)) as c:
            c.streams.video[0].thread_type = "NONE"
            for f in c.decode(video=0):
                f.to_ndarray(format="rgb24")
                n += 1
    return n


# -- (b) ------------------------------------------------------------------------------------------

class BaselineClips:
    """torch Dataset: whole-clip decode, sample T, PIL resize + crop, normalise (CLIP4Clip-style)."""

    def __init__(self, paths: list[Path], num_frames: int, size: int):
        self.paths, self.num_frames, self.size = paths, num_frames, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import av
        import torch
        from PIL import Image

        from tvr.data.frames import normalize, sample_indices

        with av.open(str(self.paths[i])) as c:
            c.streams.video[0].thread_type = "NONE"
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]   # every frame, (H, W, 3)
        out = []
        for k in sample_indices(len(frames), self.num_frames):
            img = Image.fromarray(frames[k])
            w, h = img.size
            scale = self.size / min(w, h)
            img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC)
            left, top = (img.size[0] - self.size) // 2, (img.size[1] - self.size) // 2
            out.append(np.asarray(img.crop((left, top, left + self.size, top + self.size))))
        return torch.from_numpy(normalize(np.stack(out)))                        # (T, 3, S, S)


def bench_dataloader(paths: list[Path], num_frames: int, size: int, workers: int):
    import torch

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(BaselineClips(paths, num_frames, size), batch_size=4,
                                         num_workers=workers, persistent_workers=workers > 0)

    def one_pass() -> int:
        return sum(int(b.shape[0]) for b in loader)

    return one_pass


# -- (c), (d) ------------------------------------------------------------------------------------

def bench_ray(work: Path, root_uri: str, files: list[str], num_frames: int, workers: int,
              endpoint: str | None):
    from tvr.data.annotations import Manifest
    from tvr_platform.config import load_job
    from tvr_platform.data.pipeline import video_dataset

    overrides = [f"run.work_dir={work}", "run.name=bench", f"data.root={root_uri}", f"data.num_frames={num_frames}",
                 "model.backbone.name=ViT-B-32", f"data.decode_concurrency={workers}", "data.decode_num_cpus=1",
                 "train.cpus_per_worker=0"]
    if endpoint:
        overrides += [f"storage.uri={root_uri}", f"storage.endpoint_url={endpoint}"]
    job = load_job(None, overrides)
    ids = [f[:-4] for f in files]
    manifest = Manifest(dataset="bench", split="test", video_ids=ids, video_files=files,
                        captions=["x"] * len(ids), caption_video=list(range(len(ids))))
    ds = video_dataset(job, manifest)

    def one_pass() -> int:
        return sum(int(b["frames"].shape[0]) for b in ds.iter_torch_batches(batch_size=8))

    return one_pass


def timed(fn, warmup: bool = True) -> tuple[int, float]:
    if warmup:
        fn()
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--size", type=int, default=256, help="generated frame width/height")
    ap.add_argument("--frames", type=int, default=12, help="T, sampled frames per clip")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d"])
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    T, S = args.frames, 224                                      # ViT-B-32 input size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_clips(tmp / "data", args.clips, args.seconds, args.fps, args.size)
        paths = [tmp / "data" / "videos" / f for f in files]
        n_src = int(round(args.seconds * args.fps))
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{args.clips} clips, {n_src} frames each ({args.size}x{args.size}, {args.fps} fps, keyframe "
              f"every {args.fps} frames, {mb:.1f} MB), T={T}, S={S}, workers={args.workers}, "
              f"{os.cpu_count()} CPU(s) on the machine")

        def add(name: str, clips: int, seconds: float, cores: int) -> None:
            rows.append((name, clips / seconds, clips * T / seconds, clips * T / seconds / cores, cores))

        if "a" not in args.skip:
            frames, sec = timed(lambda: bench_pyav_all(paths), warmup=False)
            add("(a) PyAV, every frame, 1 process", frames // n_src, sec, 1)
        if "b" not in args.skip:
            n, sec = timed(bench_dataloader(paths, T, S, args.workers))
            add(f"(b) torch DataLoader, {args.workers} workers, local files", n, sec, args.workers)
        if "c" in args.skip and "d" in args.skip:
            return _print(rows)
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
        try:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            if "c" not in args.skip:
                n, sec = timed(bench_ray(tmp / "work_c", str(tmp / "data"), files, T, args.workers, None))
                add(f"(c) tvr Ray Data, local dir, {args.workers} decode tasks", n, sec, args.workers)
            if "d" not in args.skip:
                import logging

                import boto3
                from moto.server import ThreadedMotoServer

                logging.getLogger("werkzeug").setLevel(logging.ERROR)             # no per-request lines

                from tvr_platform.storage import open_storage

                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
                server.start()
                endpoint = f"http://127.0.0.1:{port}"
                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
                open_storage("s3://bench/data", endpoint_url=endpoint).upload_dir(tmp / "data")
                n, sec = timed(bench_ray(tmp / "work_d", "s3://bench/data", files, T, args.workers, endpoint))
                add(f"(d) tvr Ray Data, local S3 server (moto), {args.workers} decode tasks", n, sec, args.workers)
                server.stop()
        finally:
            ray.shutdown()
    _print(rows)


def _print(rows) -> None:
    print("\n| mode | clips/s | sampled frames/s | sampled frames/s per core | cores |")
    print("|---|---:|---:|---:|---:|")
    for name, cps, fps, fpc, cores in rows:
        print(f"| {name} | {cps:.1f} | {fps:.0f} | {fpc:.0f} | {cores} |")
    by = {r[0][:3]: r[1] for r in rows}
    if "(b)" in by and "(c)" in by:
        print(f"\n(c)/(b) = {by['(c)'] / by['(b)']:.2f} (target >= 1.5)", end="")
    if "(c)" in by and "(d)" in by:
        print(f"; (d)/(c) = {by['(d)'] / by['(c)']:.2f} (target >= 0.8)", end="")
    print()


if __name__ == "__main__":
    main()
