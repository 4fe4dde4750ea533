"""Memory / throughput plan for large CLIP backbones under DeepSpeed ZeRO (prints Markdown tables).

    python benchmarks/memory_plan.py [--frames 12] [--clips-per-gpu 16] [--gpus 8 16 32] [--gpu-gib 80]

Parameter counts come from open_clip itself (models built on the meta device: no weights, no
memory). The arithmetic, per GPU, with bf16 compute and fp32 AdamW master state:

    model states (bytes/param): bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m 4 + v 4 = 16
        ZeRO-0: 16            ZeRO-1: 4 + 12/N          ZeRO-2: 2 + 14/N          ZeRO-3: 16/N
    activations of one transformer layer for one sequence of s tokens, width h, a heads
    (Korthikanti et al. 2022, bf16):  s*h*(34 + 5*a*s/h) bytes; with fused/flash attention the
    a*s^2 term is not stored: 34*s*h. With activation checkpointing only each layer's input
    (2*s*h bytes) is kept, plus one layer's full activations while it is recomputed.
    one clip = T frames through the vision tower (s = patches + 1) + one caption (s = 77).
    model FLOPs per clip (training) = 3 x forward, see tvr_platform.train.perf.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

GIB = 2**30
MODELS = ("ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14")


def model_state_bytes(params: int, stage: int, gpus: int) -> float:
    return params * {0: 16.0, 1: 4 + 12 / gpus, 2: 2 + 14 / gpus, 3: 16 / gpus}[stage]


def layer_activation_bytes(tokens: int, width: int, heads: int, flash: bool) -> float:
    return tokens * width * (34 + (0 if flash else 5 * heads * tokens / width))


def activation_bytes(shape, heads: int, sequences: int, checkpointing: bool, flash: bool) -> float:
    per_layer = layer_activation_bytes(shape.tokens, shape.width, heads, flash)
    if checkpointing:
        return sequences * (shape.layers * 2 * shape.tokens * shape.width + per_layer)
    return sequences * shape.layers * per_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--clips-per-gpu", type=int, default=16)
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    args = ap.parse_args()

    import open_clip

    from tvr_platform.train.perf import tower_shapes, train_flops_per_clip

    print(f"frames per clip T={args.frames}, clips per GPU b={args.clips_per_gpu}, GPU memory "
          f"{args.gpu_gib:g} GiB, bf16 compute, fp32 AdamW states\n")
    print("| model | params (vision + text) | states/GPU ZeRO-0 | ZeRO-2, N=8 | "
          + " | ".join(f"ZeRO-3, N={n}" for n in args.gpus)
          + " | activations/GPU (flash) | with checkpointing | train TFLOP/clip |")
    print("|---|---|---|---|" + "---|" * len(args.gpus) + "---|---|---|")
    for name in MODELS:
        clip = open_clip.create_model(name, device="meta")
        vision, text = tower_shapes(clip)
        cfg = open_clip.get_model_config(name)
        v_heads = cfg["vision_cfg"]["width"] // cfg["vision_cfg"].get("head_width", 64)
        t_heads = cfg["text_cfg"].get("heads", 8)
        params = sum(p.numel() for p in clip.parameters())
        b, t = args.clips_per_gpu, args.frames
        act = {ck: activation_bytes(vision, v_heads, b * t, ck, True) + activation_bytes(text, t_heads, b, ck, True)
               for ck in (False, True)}
        states = [model_state_bytes(params, 0, 8), model_state_bytes(params, 2, 8)]
        states += [model_state_bytes(params, 3, n) for n in args.gpus]
        print(f"| {name} | {params / 1e9:.2f} B ({vision.params / 1e9:.2f} + {text.params / 1e9:.2f}) | "
              + " | ".join(f"{s / GIB:.1f} GiB" for s in states)
              + f" | {act[False] / GIB:.1f} GiB | {act[True] / GIB:.1f} GiB | "
              f"{train_flops_per_clip(clip, t) / 1e12:.2f} |")


if __name__ == "__main__":
    main()
