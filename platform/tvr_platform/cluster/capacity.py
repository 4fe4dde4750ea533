"""Memory and throughput arithmetic for sizing GPU clusters: the numbers behind
``docs/memory-plan.md`` and the KubeRay GPU worker groups in ``infra/kuberay``.

Capacity planning, not model code: it reads the shapes of the open_clip model configs
(``open_clip.get_model_config``, no weights) and counts bytes. ``python -m
tvr_platform.cluster.capacity`` prints the tables of the memory plan.

Conventions (all in bytes; GB = 1e9, GiB = 2**30):

- Parameters Psi of a ViT tower with width w, L blocks, MLP width m = int(w * r), patch p on a
  G x G grid (G = image / p):
  ``Psi_vis = 3 p^2 w + w + (G^2 + 1) w + 2w + L (12 w^2... see vit_params) + 2w + w e``.
  The text tower: token + position embeddings, L blocks, final LayerNorm, projection; the CLIP
  temperature ``logit_scale`` (1 parameter) is counted with the text tower.
- Model states per GPU under mixed precision with AdamW (ZeRO paper, K = 12):
  bf16 weights 2 Psi, bf16 gradients 2 Psi_train, fp32 master weights + Adam m + v 12 Psi_train.
  ZeRO-1 shards the 12 Psi_train over N GPUs, ZeRO-2 also the gradients, ZeRO-3 also the weights.
- Activations per token per block, bf16, PyTorch SDPA (flash / memory-efficient attention, no
  N x N score matrix kept) and no dropout (CLIP has none) -- Korthikanti et al. 2022, eq. for
  one transformer layer with the 5 a s / h attention term and the dropout masks removed and the
  MLP ratio 4 generalised to r:
  LayerNorm inputs 2 x 2w, QKV input 2w, Q K V 3 x 2w, attention output 2w (projection input),
  MLP input 2w, GELU input 2 r w, MLP second-matmul input 2 r w  ->  (16 + 4 r) w bytes.
  With activation checkpointing per block (open_clip ``set_grad_checkpointing``) only each block's
  input (2w per token) is kept, plus one block's full activations during its recomputation.
- Fixed per-GPU overhead: CUDA context + NCCL + ZeRO buckets + allocator fragmentation, taken as
  6 GiB, and only 90 % of the card is planned (:data:`USABLE_FRACTION`); ZeRO-3 adds its
  live-parameter buffer (``stage3_max_live_parameters`` = 1e9 -> 2 GB bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9
GiB = 2**30

BYTES_WEIGHT = 2      # bf16 weights
BYTES_GRAD = 2        # bf16 gradients (DeepSpeed grad_accum_dtype bf16)
BYTES_OPTIM = 12      # fp32 master weights + Adam m + v
OVERHEAD = 6 * GiB    # CUDA context, NCCL, ZeRO buckets, fragmentation
USABLE_FRACTION = 0.9
ZERO3_LIVE_PARAMS = 1e9

# Accelerator nodes the plan is written for: GPUs per node, GPU memory (GiB), vCPUs, memory (GiB).
INSTANCES = {
    "p5.48xlarge": {"gpus": 8, "gpu_mem_gib": 80, "gpu": "H100 80GB", "vcpus": 192, "mem_gib": 2048,
                    "bf16_tflops": 989.0},
    "p4de.24xlarge": {"gpus": 8, "gpu_mem_gib": 80, "gpu": "A100 80GB", "vcpus": 96, "mem_gib": 1152,
                      "bf16_tflops": 312.0},
    "p4d.24xlarge": {"gpus": 8, "gpu_mem_gib": 40, "gpu": "A100 40GB", "vcpus": 96, "mem_gib": 1152,
                     "bf16_tflops": 312.0},
    "g6e.12xlarge": {"gpus": 4, "gpu_mem_gib": 48, "gpu": "L40S 48GB", "vcpus": 48, "mem_gib": 384,
                     "bf16_tflops": 362.0},
}
MODELS = ("ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14")


@dataclass(frozen=True)
class Tower:
    """Shape of one transformer tower."""

    width: int
    layers: int
    mlp_ratio: float
    tokens: int  # sequence length: patches + class token, or the text context

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class ModelShape:
    name: str
    vision: Tower
    text: Tower
    embed_dim: int
    patch: int
    vocab: int
    vision_params: int
    text_params: int

    @property
    def params(self) -> int:
        return self.vision_params + self.text_params


def _block_params(w: int, m: int) -> int:
    # ln_1 (2w) + in_proj (3w*w + 3w) + out_proj (w*w + w) + ln_2 (2w) + c_fc (w*m + m) + c_proj (m*w + w)
    return 2 * w + 3 * w * w + 3 * w + w * w + w + 2 * w + w * m + m + m * w + w


def vit_params(*, width: int, layers: int, mlp_ratio: float, patch: int, image: int, embed_dim: int) -> int:
    """Parameters of open_clip's VisionTransformer (class token, learned positions, pre/post LN)."""
    grid = image // patch
    m = int(width * mlp_ratio)
    return (3 * patch * patch * width          # conv1, no bias
            + width                            # class_embedding
            + (grid * grid + 1) * width        # positional_embedding
            + 2 * width                        # ln_pre
            + layers * _block_params(width, m)
            + 2 * width                        # ln_post
            + width * embed_dim)               # proj


def text_params(*, width: int, layers: int, context: int, vocab: int, embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """Parameters of open_clip's text transformer, plus the CLIP ``logit_scale``."""
    m = int(width * mlp_ratio)
    return (vocab * width + context * width + layers * _block_params(width, m)
            + 2 * width + width * embed_dim + 1)


def model_shape(name: str) -> ModelShape:
    """Tower shapes and exact parameter counts of an open_clip model config (no weights loaded)."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"{name!r} is not an open_clip model config")
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    v_ratio, t_ratio = v.get("mlp_ratio", 4.0), t.get("mlp_ratio", 4.0)
    grid = v["image_size"] // v["patch_size"]
    return ModelShape(
        name=name,
        vision=Tower(v["width"], v["layers"], v_ratio, grid * grid + 1),
        text=Tower(t["width"], t["layers"], t_ratio, t["context_length"]),
        embed_dim=e, patch=v["patch_size"], vocab=t["vocab_size"],
        vision_params=vit_params(width=v["width"], layers=v["layers"], mlp_ratio=v_ratio, patch=v["patch_size"],
                                 image=v["image_size"], embed_dim=e),
        text_params=text_params(width=t["width"], layers=t["layers"], context=t["context_length"],
                                vocab=t["vocab_size"], embed_dim=e, mlp_ratio=t_ratio),
    )


# -- memory ------------------------------------------------------------------------------------

def model_state_bytes(params: int, *, stage: int, gpus: int, trainable: int | None = None) -> float:
    """Weights + gradients + optimizer states held by one GPU under ZeRO ``stage`` on ``gpus`` GPUs."""
    trainable = params if trainable is None else trainable
    weights = BYTES_WEIGHT * params / (gpus if stage >= 3 else 1)
    grads = BYTES_GRAD * trainable / (gpus if stage >= 2 else 1)
    optim = BYTES_OPTIM * trainable / (gpus if stage >= 1 else 1)
    return weights + grads + optim + (BYTES_WEIGHT * ZERO3_LIVE_PARAMS if stage >= 3 else 0)


def block_activation_bytes(tower: Tower) -> float:
    """Activations one block keeps for backward, per sequence: tokens * (16 + 4 r) * w."""
    return tower.tokens * (16 + 4 * tower.mlp_ratio) * tower.width


def tower_activation_bytes(tower: Tower, *, checkpointing: bool) -> float:
    """Activation memory of one sequence (a frame, a caption) through the whole tower."""
    if not checkpointing:
        return tower.layers * block_activation_bytes(tower)
    return tower.layers * 2 * tower.tokens * tower.width + block_activation_bytes(tower)


def clip_activation_bytes(shape: ModelShape, *, frames: int, checkpointing: bool) -> float:
    """One training example: ``frames`` frames through the vision tower + one caption."""
    return (frames * tower_activation_bytes(shape.vision, checkpointing=checkpointing)
            + tower_activation_bytes(shape.text, checkpointing=checkpointing))


def max_clips_per_gpu(shape: ModelShape, *, stage: int, gpus: int, gpu_mem_gib: float, frames: int,
                      checkpointing: bool) -> int:
    """Largest micro-batch (clips) one GPU holds next to its model states; 0 = does not fit."""
    free = USABLE_FRACTION * gpu_mem_gib * GiB - OVERHEAD - model_state_bytes(shape.params, stage=stage, gpus=gpus)
    return max(0, math.floor(free / clip_activation_bytes(shape, frames=frames, checkpointing=checkpointing)))


# -- compute -----------------------------------------------------------------------------------

def tower_forward_flops(tower: Tower, block_params: int) -> float:
    """2 FLOPs per parameter per token in the blocks + 4 s^2 w per block for attention."""
    return 2 * block_params * tower.tokens + 4 * tower.layers * tower.tokens**2 * tower.width


def clip_train_flops(shape: ModelShape, *, frames: int, checkpointing: bool) -> float:
    """Forward + backward (2x forward) + recomputation (1x forward when checkpointing)."""
    v, t = shape.vision, shape.text
    fwd = (frames * tower_forward_flops(v, v.layers * _block_params(v.width, v.mlp_width))
           + tower_forward_flops(t, t.layers * _block_params(t.width, t.mlp_width)))
    return fwd * (4 if checkpointing else 3)


def clips_per_second(shape: ModelShape, *, frames: int, checkpointing: bool, tflops: float, mfu: float = 0.4) -> float:
    return mfu * tflops * 1e12 / clip_train_flops(shape, frames=frames, checkpointing=checkpointing)


# -- the plan ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How one backbone is trained (both towers fully fine-tuned, bf16, AdamW)."""

    model: str
    stage: int
    instance: str
    nodes: int
    frames: int = 12
    checkpointing: bool = True

    @property
    def gpus(self) -> int:
        return self.nodes * INSTANCES[self.instance]["gpus"]


PLANS = (
    Plan("ViT-L-14", stage=0, instance="p5.48xlarge", nodes=1, checkpointing=False),
    Plan("ViT-H-14", stage=1, instance="p5.48xlarge", nodes=1),
    Plan("ViT-g-14", stage=2, instance="p5.48xlarge", nodes=1),
    Plan("ViT-bigG-14", stage=2, instance="p5.48xlarge", nodes=1),
)
"""The recommended setup per backbone: the smallest ZeRO stage that leaves most of an 80 GB card
to activations on one 8-GPU node. More nodes only grow the global batch (more negatives)."""

ALTERNATIVES = (
    Plan("ViT-bigG-14", stage=2, instance="p5.48xlarge", nodes=1, checkpointing=False),
    Plan("ViT-bigG-14", stage=2, instance="p5.48xlarge", nodes=4),
    Plan("ViT-bigG-14", stage=3, instance="p5.48xlarge", nodes=4),
    Plan("ViT-bigG-14", stage=2, instance="p4de.24xlarge", nodes=1),
    Plan("ViT-bigG-14", stage=2, instance="p4d.24xlarge", nodes=1),
    Plan("ViT-bigG-14", stage=3, instance="p4d.24xlarge", nodes=1),
    Plan("ViT-bigG-14", stage=0, instance="p5.48xlarge", nodes=1),
    Plan("ViT-L-14", stage=0, instance="g6e.12xlarge", nodes=1),
)
"""What changes with the knobs: no checkpointing, more nodes, ZeRO-3, 40/48 GB cards."""


def plan_rows(plans: tuple[Plan, ...] = PLANS) -> list[dict]:
    rows = []
    for p in plans:
        s = model_shape(p.model)
        inst = INSTANCES[p.instance]
        state = model_state_bytes(s.params, stage=p.stage, gpus=p.gpus)
        clips = max_clips_per_gpu(s, stage=p.stage, gpus=p.gpus, gpu_mem_gib=inst["gpu_mem_gib"], frames=p.frames,
                                  checkpointing=p.checkpointing)
        rows.append({
            "model": p.model, "params_m": s.params / 1e6, "stage": p.stage, "gpus": p.gpus, "nodes": p.nodes,
            "state_gb": state / GB, "frames": p.frames, "ckpt": p.checkpointing,
            "clip_gb": clip_activation_bytes(s, frames=p.frames, checkpointing=p.checkpointing) / GB,
            "clips_per_gpu": clips, "global_batch": clips * p.gpus, "instance": p.instance,
            "clips_s": clips_per_second(s, frames=p.frames, checkpointing=p.checkpointing,
                                        tflops=inst["bf16_tflops"]) * p.gpus,
        })
    return rows


def markdown_tables() -> str:
    """The tables of docs/memory-plan.md (a test checks the document carries them verbatim)."""
    out = ["| model | vision params | text params | total | vision w / L / r / tokens | text w / L / tokens |",
           "|---|---:|---:|---:|---|---|"]
    for name in MODELS:
        s = model_shape(name)
        out.append(f"| {name} | {s.vision_params:,} | {s.text_params:,} | {s.params:,} | "
                   f"{s.vision.width} / {s.vision.layers} / {s.vision.mlp_ratio:g} / {s.vision.tokens} | "
                   f"{s.text.width} / {s.text.layers} / {s.text.tokens} |")
    out += ["", "Model states per GPU (GB), bf16 + AdamW, both towers trained:", "",
            "| model | GPUs | DDP (16 Psi) | ZeRO-1 | ZeRO-2 | ZeRO-3 |", "|---|---:|---:|---:|---:|---:|"]
    for name in MODELS:
        psi = model_shape(name).params
        for n in (8, 16, 32):
            cells = " | ".join(f"{model_state_bytes(psi, stage=st, gpus=n) / GB:.1f}" for st in range(4))
            out.append(f"| {name} | {n} | {cells} |")
    out += ["", "Activations (GB) per frame / per caption / per 12-frame clip + caption:", "",
            "| model | frame, no ckpt | frame, ckpt | caption, no ckpt | caption, ckpt | clip, no ckpt | clip, ckpt |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name in MODELS:
        s = model_shape(name)
        vals = [tower_activation_bytes(s.vision, checkpointing=False), tower_activation_bytes(s.vision, checkpointing=True),
                tower_activation_bytes(s.text, checkpointing=False), tower_activation_bytes(s.text, checkpointing=True),
                clip_activation_bytes(s, frames=12, checkpointing=False),
                clip_activation_bytes(s, frames=12, checkpointing=True)]
        out.append(f"| {name} | " + " | ".join(f"{v / GB:.3f}" for v in vals) + " |")
    out += ["", "The plan (40 % MFU assumed for throughput):", "", *_plan_table(plan_rows(PLANS)),
            "", "Alternatives:", "", *_plan_table(plan_rows(ALTERNATIVES))]
    return "\n".join(out)


def _plan_table(rows: list[dict]) -> list[str]:
    out = ["| model | node type | ZeRO | GPUs (nodes) | states/GPU (GB) | frames | ckpt | GB/clip | "
           "clips/GPU | global batch | clips/s |",
           "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        inst = INSTANCES[r["instance"]]
        out.append(f"| {r['model']} | {r['instance']} ({inst['gpus']} x {inst['gpu']}) | {r['stage']} | "
                   f"{r['gpus']} ({r['nodes']}) | {r['state_gb']:.1f} | {r['frames']} | {'yes' if r['ckpt'] else 'no'} | "
                   f"{r['clip_gb']:.2f} | {r['clips_per_gpu']} | {r['global_batch']} | {r['clips_s']:.0f} |")
    return out


if __name__ == "__main__":
    print(markdown_tables())
