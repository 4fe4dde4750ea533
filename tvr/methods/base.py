"""The one small interface every retrieval method implements, and the spec that registers it.

A method is an ``nn.Module`` that owns a :class:`~tvr.backbone.ClipBackbone` and implements

- ``encode_text(text)``          (B, L) token ids            -> dict of tensors, first dim B
- ``encode_video(frames, captions=None)``
                                  (B, T, 3, H, W) floats      -> dict of tensors, first dim B
                                  captions: optional (B, K, L) auxiliary caption ids (ExCae)
- ``similarity(text, video)``    inference scores            -> (N_text, N_video)
- ``loss(text, video)``          training objective on a (global) batch whose i-th text
                                  describes the i-th video   -> {"loss": scalar, other scalars...}
- ``param_groups(lr, backbone_lr, weight_decay)``            -> torch optimizer param groups

Optionally ``prepare_video(video)`` -> the same features plus text-independent tensors that
``similarity`` would otherwise recompute for every block of texts (X-Pool's frame keys / values);
the platform calls it once per evaluation and once per search index (:func:`prepare_video`).
Every prepared tensor shares the first dimension N_v, and ``similarity`` gives the same scores with
or without them.

A method whose ``similarity`` is exactly the cosine of one global text and one global video
embedding sets the class attribute ``global_cosine = True`` (meanP); search then answers it from a
nearest-neighbour index.

Every output is a flat ``dict[str, Tensor]`` whose tensors share their first dimension with the
batch, so the platform can gather them across workers, slice them into evaluation blocks and
concatenate them without knowing the method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from tvr.backbone import ClipBackbone

Features = dict[str, Tensor]


@runtime_checkable
class RetrievalMethod(Protocol):
    backbone: ClipBackbone

    def encode_text(self, text: Tensor) -> Features: ...

    def encode_video(self, frames: Tensor, captions: Tensor | None = None) -> Features: ...

    def similarity(self, text: Features, video: Features) -> Tensor: ...

    def loss(self, text: Features, video: Features) -> dict[str, Tensor]: ...

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class MethodSpec:
    """Registry entry: a method's name, its typed config class and its builder."""

    name: str
    config_cls: type
    build: Callable[[Any, ClipBackbone], nn.Module]
    summary: str = ""


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # open_clip's rule: no weight decay on gains, biases, embeddings and the temperature.
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
        or "embedding" in name or "prompt" in name


def backbone_head_groups(module: nn.Module, lr: float, backbone_lr: float,
                         weight_decay: float) -> list[dict[str, Any]]:
    """Param groups: parameters under ``backbone.`` get ``backbone_lr``, the rest ``lr``; each
    split again into decayed / not decayed. Frozen parameters are left out, so the optimiser
    only ever sees what trains. Empty groups are dropped."""
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("backbone."), _no_decay(name, p))
        buckets.setdefault(key, []).append(p)
    groups = []
    for (is_backbone, no_decay), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "lr": backbone_lr if is_backbone else lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'backbone' if is_backbone else 'head'}{'/no_decay' if no_decay else ''}",
        })
    return groups


def prepare_video(method: Any, video: Features) -> Features:
    """``method.prepare_video(video)`` where the method has one, else ``video`` unchanged."""
    prepare = getattr(method, "prepare_video", None)
    return video if prepare is None else prepare(video)
