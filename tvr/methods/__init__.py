"""The method table: the one place a method name maps to its config class and builder.

Adding a method = one module ``tvr/methods/<name>.py`` exporting ``SPEC`` + one line here.
"""

from __future__ import annotations

from torch import nn

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods import excae, meanp, tmass, ucofia, vop, xpool
from tvr.methods.base import Features, MethodSpec, RetrievalMethod

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    meanp.SPEC,
    xpool.SPEC,
    tmass.SPEC,
    ucofia.SPEC,
    vop.SPEC,
    excae.SPEC,
)}


def get_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"model.method={name!r} is not a tvr method; choose one of {sorted(METHODS)}") from None


def build_method(name: str, cfg: object, backbone: ClipBackbone | BackboneCfg) -> nn.Module:
    """Build method ``name`` with its config object on a backbone (or a backbone config)."""
    spec = get_spec(name)
    if not isinstance(cfg, spec.config_cls):
        raise TypeError(f"method {name!r} expects a {spec.config_cls.__name__}, got {type(cfg).__name__}")
    if isinstance(backbone, BackboneCfg):
        backbone = ClipBackbone(backbone)
    return spec.build(cfg, backbone)


__all__ = ["METHODS", "Features", "MethodSpec", "RetrievalMethod", "build_method", "get_spec"]
