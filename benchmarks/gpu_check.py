"""One prepared device check (issue 19): per method, single-device training-step throughput, MFU and
peak memory, then embedding + scoring wall time of an N x N evaluation. Prints Markdown tables.

    python benchmarks/gpu_check.py                       # on a GPU: ViT-B-16, bf16, batch 32 x 12 frames, 1k x 1k
    python benchmarks/gpu_check.py --tiny                # CPU smoke run (tvr-tiny, batch 4 x 2, 16 x 16): checks the script

Random-init weights (throughput does not depend on them). MFU = model FLOPs/s (3 x forward,
``tvr_platform.train.perf``) over the measured bf16 matmul peak of the device. ZeRO-2 vs DDP needs
several devices and Ray Train: ``tvr train jobs/train.yaml train.strategy=ddp|deepspeed
train.zero_stage=2 train.use_gpu=true`` logs ``perf/samples_per_s`` and ``perf/mfu`` to MLflow.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

METHODS = ("meanp", "xpool", "tmass", "ucofia")


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(method: str, backbone: str, frames: int, device: torch.device):
    from tvr.backbone import BackboneCfg, ClipBackbone
    from tvr.methods import build_method
    from tvr_platform.config import load_job
    from tvr_platform.train.step import RetrievalStep

    job = load_job(None, [f"model.method={method}", f"model.backbone.name={backbone}", f"data.num_frames={frames}",
                          *([f"model.tmass.num_frames={frames}"] if method == "tmass" else [])])
    m = build_method(method, job.method_cfg, ClipBackbone(BackboneCfg(name=backbone)))
    return RetrievalStep(m, gather=lambda x: x).to(device)


def train_row(method: str, args, device: torch.device, peak: float) -> dict:
    from tvr_platform.train.perf import mfu, train_flops_per_clip

    model = build(method, args.backbone, args.frames, device)
    bb = model.method.backbone
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    frames = torch.randn(args.batch, args.frames, 3, bb.image_size, bb.image_size, device=device)
    text = bb.tokenize([f"caption number {i}" for i in range(args.batch)]).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(mode="loss", frames=frames, text=text)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    s = (time.perf_counter() - t) / args.steps
    clips_s = args.batch / s
    flops = train_flops_per_clip(bb.clip, args.frames)
    return {"method": method, "step_ms": 1000 * s, "clips_s": clips_s,
            "mfu": mfu(clips_s, flops, peak) if peak else float("nan"), "peak_mb": peak_mem_mb(device),
            "model": model}


@torch.no_grad()
def eval_row(method: str, model, args, device: torch.device) -> dict:
    from tvr_platform.evaluation import embed_texts, embed_videos, evaluate

    model.eval()
    bb = model.method.backbone
    n = args.eval_n
    dtype = torch.bfloat16 if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    batches = [{"frames": torch.randn(min(args.batch, n - i), args.frames, 3, bb.image_size, bb.image_size,
                                      generator=g), "video_index": torch.arange(i, min(i + args.batch, n))}
               for i in range(0, n, args.batch)]
    texts = bb.tokenize([f"caption number {i}" for i in range(n)])
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        video, _ = embed_videos(model, batches, device)
        text = embed_texts(model, texts, args.batch, device)
        sync(device)
        t1 = time.perf_counter()
        metrics, _ = evaluate(model, text, video, torch.arange(n), block=args.block, device=device)
    sync(device)
    t2 = time.perf_counter()
    return {"embed_s": t1 - t0, "score_s": t2 - t1, "R1": metrics["t2v_R1"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke settings (tvr-tiny, small batch, 16 x 16)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--backbone", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--block", type=int, default=1024)
    args = ap.parse_args(argv)
    if args.tiny:
        args.backbone, args.batch, args.frames, args.steps, args.warmup, args.eval_n = "tvr-tiny", 4, 2, 2, 1, 16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from tvr_platform.train.perf import measure_peak_flops

    peak = measure_peak_flops(device) if device.type == "cuda" else 0.0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; backbone {args.backbone}; batch {args.batch} x {args.frames} frames; "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; measured bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s" if peak else f"device: {name} (no MFU on CPU)")
    print(f"\n| method | step ms | clips/s | MFU | peak MB | embed {args.eval_n} s | score {args.eval_n}x{args.eval_n} s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods:
        row = train_row(method, args, device, peak)
        ev = eval_row(method, row.pop("model"), args, device)
        print(f"| {method} | {row['step_ms']:.0f} | {row['clips_s']:.1f} | {row['mfu']:.3f} | "
              f"{row['peak_mb']:.0f} | {ev['embed_s']:.2f} | {ev['score_s']:.2f} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
