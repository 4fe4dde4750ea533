"""Deep prompt tuning inside a frozen open_clip CLIP: the block-by-block encoder loops.

Both towers are run here layer by layer over open_clip's own modules (``resblocks``, the
embeddings, the final norms and projections), so learnable prompt tokens can be inserted before
a block and replaced by fresh ones before the next (VPT-deep, Jia et al. 2022). Nothing of
open_clip's code is copied: only its exposed modules are called.

Text tower, n_t prompt tokens per prompted layer, inserted right after the SOT token::

    layer 0:   x⁰ = [e_sot, P⁰_1..P⁰_n, e_w1 .. e_eos .. e_pad] + E_pos[:S]     S = L + n_t
    layer l:   xˡ = [xˡ_sot, Pˡ_1..Pˡ_n, xˡ_w1 ..]           (prompt states replaced, l < depth)
    t = ln_final(x^{N_l})[eos + n_t] · W_text                    EOS index shifted by n_t

The causal mask is CLIP's, cut to S x S (prompts see SOT and earlier prompts; words see all
prompts). If L + n_t exceeds the positional table, captions are cut to ``ctx - n_t`` tokens and
the EOS is moved to the last kept slot, as the tokenizer truncates (official VoP tokenises to
``77 - n_t`` tokens instead, which is the same thing).

Visual tower, per frame f of a clip (per-frame prompts, any number m of them)::

    x⁰_f = ln_pre([x_cls, P⁰_f, x_p1 .. x_pN] + [E_pos[0], -, E_pos[1:]])   prompts carry no position
    intra-frame layer l:  x^{l+1}_f = Block_l([xˡ_cls, Pˡ_f, xˡ_patches])    one sequence per frame
    inter-frame layer l:  [Vˡ, x^{l+1}_1 .. x^{l+1}_T] = Block_l([Vˡ, xˡ_1, .., xˡ_T])
                          one joint sequence per clip: every token attends to every token of
                          every frame, and to the clip-level prompts Vˡ (VoP-F)
    f_f = ln_post(x^{N_l}_f)[cls] · W_vis

Prompt tokens are removed before fresh ones are inserted; layers at or past ``depth`` keep the
(propagated) prompt states of the last prompted layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tvr.temporal import TemporalEncoder


def trainable_parameters(module: nn.Module) -> tuple[int, int]:
    """(number of parameters with ``requires_grad``, number of all parameters) of ``module``."""
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in module.parameters())
    return n_train, n_total


def run_block(transformer: nn.Module, block: nn.Module, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """One open_clip residual block on batch-first x (N, S, w), honouring the transformer's
    layout (``batch_first``) and activation checkpointing flag."""
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)                                            # (S, N, w)
    if getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
        x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
    else:
        x = block(x, attn_mask=attn_mask)
    return x if batch_first else x.transpose(0, 1)                       # (N, S, w)


# -- text tower --------------------------------------------------------------------------------

def text_pool_spec(tower: nn.Module) -> tuple[str, int | None]:
    """open_clip's text pooling rule (``argmax``/``eos``/``first``/``last``) and EOS id."""
    if getattr(tower, "cls_emb", None) is not None:
        raise ValueError("model.method=vop: text towers with an appended CLS embedding (CoCa) are not supported")
    pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
    eos_id = getattr(tower, "text_eos_id", None) if hasattr(tower, "text_pool_type") else getattr(tower, "eos_id", None)
    if pool not in ("argmax", "eos", "first", "last"):
        raise ValueError(f"model.method=vop: text pool type {pool!r} is not supported")
    return pool, eos_id


def eos_index(text: Tensor, pool: str, eos_id: int | None) -> Tensor:
    """Index of the pooled token in the ids (B, L) -> (B,), before any prompt shift."""
    B, L = text.shape
    if pool == "argmax":
        return text.argmax(dim=-1)
    if pool == "eos":
        return (text == eos_id).int().argmax(dim=-1)
    fill = 0 if pool == "first" else L - 1
    return torch.full((B,), fill, dtype=torch.long, device=text.device)


def truncate_text(text: Tensor, keep: int, pool: str, eos_id: int | None) -> Tensor:
    """Cut ids (B, L) to (B, keep), moving an EOS that falls off to the last kept slot."""
    if text.shape[1] <= keep:
        return text
    if keep < 2:
        raise ValueError(f"model.method=vop: {keep} text positions left after the prompts; "
                         "lower text_prompt_length")
    idx = eos_index(text, pool, eos_id)                                  # (B,)
    out = text[:, :keep].clone()                                         # (B, keep)
    if pool in ("argmax", "eos"):
        rows = torch.nonzero(idx >= keep).flatten()
        out[rows, keep - 1] = text[rows, idx[rows]]
    return out


def prompted_text_states(tower: nn.Module, text: Tensor, prompts: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Run the text tower with deep prompts after SOT.

    text (B, L) ids; prompts (depth, n, w) or None. Returns the final states after ``ln_final``
    (B, S, w), the ids actually used (B, S - n) and the pooled index into the states (B,).
    """
    pool, eos_id = text_pool_spec(tower)
    depth, n = (0, 0) if prompts is None else prompts.shape[:2]
    n_pos = tower.positional_embedding.shape[0]
    text = truncate_text(text, n_pos - n, pool, eos_id)                  # (B, L'), L' + n <= n_pos
    B, L = text.shape
    S = L + n
    blocks = tower.transformer.resblocks
    if depth > len(blocks):
        raise ValueError(f"model.method=vop: prompt_depth={depth} exceeds the text tower's {len(blocks)} layers")
    cast = tower.transformer.get_cast_dtype()
    mask = tower.attn_mask
    mask = None if mask is None else mask[:S, :S]                        # (S, S) causal
    x = tower.token_embedding(text).to(cast)                             # (B, L, w)
    for layer, block in enumerate(blocks):
        if layer < depth:
            p = prompts[layer].to(x.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, n, w)
            keep_from = 1 if layer == 0 else 1 + n                       # drop the old prompt states
            x = torch.cat([x[:, :1], p, x[:, keep_from:]], dim=1)        # (B, S, w)
        if layer == 0:
            x = x + tower.positional_embedding[:S].to(x.dtype)           # (B, S, w)
        x = run_block(tower.transformer, block, x, mask)                 # (B, S, w)
    x = tower.ln_final(x)                                                # (B, S, w)
    idx = eos_index(text, pool, eos_id)
    idx = idx + n if pool in ("argmax", "eos") else (idx if pool == "first" else torch.full_like(idx, S - 1))
    return x, text, idx


def project_text(tower: nn.Module, x: Tensor) -> Tensor:
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


# -- visual tower ------------------------------------------------------------------------------

FramePromptFn = Callable[[int, Tensor, int, int], Tensor]
"""(layer, x (B*T, S, w) states entering the layer, B, T) -> per-frame prompts (B*T, n, w)."""
ClipPromptFn = Callable[[int, int], Tensor]
"""(layer, B) -> clip-level prompts (B, n, w) for an inter-frame layer."""


def check_visual(visual: nn.Module) -> None:
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        raise ValueError("model.method=vop: vision towers with attentional pooling are not supported")
    if not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
        raise ValueError("model.method=vop: needs an open_clip VisionTransformer (conv1 + class token)")


def prompted_frame_states(visual: nn.Module, frames: Tensor, *, depth: int, intra_layers: int,
                          frame_prompts: FramePromptFn | None, clip_prompts: ClipPromptFn | None,
                          hidden: list[Tensor] | None = None) -> Tensor:
    """Frames (B, T, 3, H, W) -> per-frame features (B, T, D) through the prompted ViT.

    Layers ``< intra_layers`` are intra-frame (one sequence per frame); the rest are
    inter-frame (one joint sequence per clip). Layers ``< depth`` get fresh prompts: per-frame
    ones from ``frame_prompts`` in intra-frame layers, clip-level ones from ``clip_prompts`` in
    inter-frame layers. If ``hidden`` is a list, the per-frame states after every block
    (B, T, S, w) are appended to it (tests use this).
    """
    B, T = frames.shape[:2]
    blocks = visual.transformer.resblocks
    x = visual.conv1(frames.flatten(0, 1))                               # (B*T, w, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)           # (B*T, N, w)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)  # (B*T, 1, w)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B*T, 1+N, w)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)                                                 # (B*T, 1+N, w)
    m = 0                                                                # per-frame prompt tokens in x
    v = x.new_zeros(B, 0, x.shape[-1])                                   # clip-level prompts (B, n_v, w)
    for layer, block in enumerate(blocks):
        joint = layer >= intra_layers
        if layer < depth and not joint and frame_prompts is not None:
            p = frame_prompts(layer, x, B, T).to(x.dtype)                # (B*T, n, w)
            if layer == 0:
                p = visual.ln_pre(p)                                     # official: ln_pre sees the layer-0 prompts
            x = torch.cat([x[:, :1], p, x[:, 1 + m:]], dim=1)            # (B*T, 1+n+N, w)
            m = p.shape[1]
        elif layer < depth and joint and clip_prompts is not None:
            x = torch.cat([x[:, :1], x[:, 1 + m:]], dim=1)               # (B*T, 1+N, w) per-frame prompts out
            m = 0
            v = clip_prompts(layer, B).to(x.dtype)                       # (B, n_v, w)
            if layer == 0:
                v = visual.ln_pre(v)
        if joint:
            S = x.shape[1]
            xj = torch.cat([v, x.reshape(B, T * S, -1)], dim=1)          # (B, n_v + T*S, w)
            xj = run_block(visual.transformer, block, xj)
            v, x = xj[:, :v.shape[1]], xj[:, v.shape[1]:].reshape(B * T, S, -1)  # (B, n_v, w), (B*T, S, w)
        else:
            x = run_block(visual.transformer, block, x)                  # (B*T, S, w)
        if hidden is not None:
            hidden.append(x.reshape(B, T, x.shape[1], -1))               # (B, T, S, w)
    if getattr(visual, "final_ln_after_pool", False):
        pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1 + m:].mean(dim=1)
        pooled = visual.ln_post(pooled)                                  # (B*T, w)
    else:
        x = visual.ln_post(x)
        pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1 + m:].mean(dim=1)  # (B*T, w)
    if visual.proj is not None:
        pooled = pooled @ visual.proj                                    # (B*T, D)
    return pooled.reshape(B, T, -1)                                      # (B, T, D)


class ContextPromptGenerator(nn.Module):
    """VoP-C prompt generator for one layer: frame summaries of a clip -> per-frame prompt offsets.

        z_f = W_down · LN(s_f)                 s_f: frame f's [CLS] state entering the layer (w)
        h   = TemporalEncoder(z_1 .. z_T)      light 1-layer transformer over frames (r)
        ΔP_f = W_up · h_f                      (w), added to every prompt token of frame f

    ``LN`` has no affine parameters (CLIP's residual stream has a few very large channels).
    ``W_up`` is zero-initialised, so at step 0 VoP-C equals the static-prompt model.
    """

    def __init__(self, *, width: int, dim: int, num_frames: int):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.temporal = TemporalEncoder(dim=dim, num_frames=num_frames, layers=1, heads=1)
        self.up = nn.Linear(dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, summary: Tensor) -> Tensor:
        """summary (B, T, w) -> offsets (B, T, w)."""
        z = self.down(F.layer_norm(summary, summary.shape[-1:]))         # (B, T, r)
        return self.up(self.temporal(z))                                 # (B, T, w)


def generator_parameters(*, width: int, dim: int, num_frames: int) -> int:
    """Closed-form parameter count of one :class:`ContextPromptGenerator` (for reports)."""
    r = dim
    temporal = num_frames * r + (4 * r * r + 4 * r) + (8 * r * r + 5 * r) + 4 * r + (r * r + r)
    return (width * r + r) + temporal + (r * width + width)
