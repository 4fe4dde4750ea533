"""One wrapper over open_clip ViT models, shared by every method.

For a batch of clips ``frames`` of shape (B, T, 3, H, W) and captions ``text`` of token ids (B, L)
it returns, all in CLIP's joint embedding space (dimension D = ``embed_dim``):

- per-frame CLS features   (B, T, D)
- per-frame patch tokens   (B, T, P, D)       on request (``patches=True``)
- the sentence feature     (B, D)             CLIP's EOS ("argmax") token after ``text_projection``
- word tokens              (B, L, D)          every position projected the same way, with
- the padding mask         (B, L) bool        True at real tokens (SOT .. EOS), False at padding.

Model names are any open_clip model (``ViT-B-32`` ... ``ViT-bigG-14``), an open_clip Hugging Face
name (``hf-hub:org/repo``: config, weights and tokenizer from the hub; ``pretrained`` must then be
empty) or a local open_clip folder (``local-dir:/path`` with ``open_clip_config.json``), plus the
tiny random-init configs shipped in ``tvr/model_configs`` (``tvr-tiny``, ``tvr-small``) for tests and
the quickstart. ``pretrained`` is an open_clip tag (downloaded by open_clip where a network exists)
or a checkpoint file in open_clip's format (``.pt`` / ``.bin`` / ``.safetensors``, a state dict or
``{"state_dict": ...}``, OpenAI's JIT files included); ``s3://`` checkpoints are fetched to a local
file by the platform before this runs.

Activation (QuickGELU vs GELU). OpenAI's CLIP weights (and MetaCLIP's) were trained with QuickGELU,
x·σ(1.702x), while open_clip's plain configs (``ViT-B-32`` ...) build ``nn.GELU``; open_clip only
*warns* on the mismatch. Here ``quick_gelu=None`` (default) follows the weights: the pretrained tag's
open_clip config (``quick_gelu: true`` for ``openai`` / ``metaclip_*``), an hf-hub / local-dir
config's own ``quick_gelu``, else the model config. A value that contradicts the tag (``quick_gelu``
false with ``openai``, a ``-quickgelu`` model with a GELU tag) is an error. A checkpoint *file* says
nothing about its activation: OpenAI weights saved to a file need ``quick_gelu=true``.

Checkpoint reading is split out (:func:`read_checkpoint`, :func:`load_checkpoint_into`) so the
platform can load the same files into a model built elsewhere (e.g. partitioned under ZeRO-3).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

TVR_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in TVR_MODEL_CONFIGS.glob("*.json")))


@dataclass(kw_only=True)
class BackboneCfg:
    name: str = "tvr-tiny"
    """open_clip model name (ViT-B-32, ViT-L-14, ViT-bigG-14, ...) or a tvr tiny config."""
    pretrained: str | None = None
    """open_clip pretrained tag, a local checkpoint path, or an s3:// URI; None = random init."""
    grad_checkpointing: bool = False
    """Activation checkpointing in both towers (open_clip's set_grad_checkpointing)."""
    quick_gelu: bool | None = None
    """QuickGELU activations; None = what the weights were trained with (the tag's open_clip config,
    e.g. true for openai); a value contradicting the tag is an error. Set true for OpenAI weights in
    a checkpoint file."""
    image_size: int = 0
    """Input resolution of the vision tower; 0 = the model config's (224 for ViT-B/32). Another value
    (open_clip's ``force_image_size``) interpolates the pretrained position embedding to the new patch
    grid; the data pipeline decodes frames at this size (not with ZeRO-3 + pretrained weights, whose
    partitioned loader does not resize: the config loader says so)."""

    def __post_init__(self) -> None:
        if self.image_size < 0:
            raise ValueError(f"model.backbone.image_size={self.image_size} must be >= 0 (0 = the model's own)")
        # The activation check reads open_clip's configs only (no weights, no network).
        # An unknown tag is reported when the model is built (the spec may name a tag of a newer open_clip).
        known = not self.pretrained or is_checkpoint_file(self.pretrained) or \
            self.pretrained in open_clip.list_pretrained_tags_by_model(self.name)
        if not self.name.startswith(SCHEMAS) and self.name in _known_models() and known:
            resolve_quick_gelu(self.name, self.pretrained, self.quick_gelu)


def register_tvr_model_configs() -> None:
    """Make tvr's tiny configs known to open_clip (idempotent, called lazily, never at import)."""
    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(TVR_MODEL_CONFIGS)


def get_tokenizer(name: str):
    """open_clip's tokenizer for model ``name`` (tvr tiny configs included): list[str] -> (N, L)."""
    register_tvr_model_configs()
    return open_clip.get_tokenizer(name)


SCHEMAS = ("hf-hub:", "local-dir:")


def _known_models() -> list[str]:
    register_tvr_model_configs()
    return open_clip.list_models()


def is_checkpoint_file(pretrained: str | None) -> bool:
    """True when ``pretrained`` names a file (a path or a checkpoint suffix), not an open_clip tag."""
    return bool(pretrained) and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))


def model_config(name: str) -> dict:
    """open_clip's model config for ``name`` (built-in, tvr tiny, hf-hub: or local-dir:), a copy."""
    register_tvr_model_configs()
    if name.startswith("local-dir:") and not (Path(name.split(":", 1)[1]) / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"model.backbone.name={name!r}: no open_clip_config.json in that folder")
    cfg = open_clip.factory.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"model.backbone.name={name!r} is not an open_clip model; choose one of "
            f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT'))[:400]}..., an "
            f"'hf-hub:org/repo' / 'local-dir:/path' name, or a tvr test config {TINY_MODELS}")
    return cfg


def pretrained_tag_cfg(name: str, pretrained: str | None) -> dict:
    """open_clip's pretrained config of tag ``pretrained`` for model ``name`` ({} for files / none)."""
    if not pretrained or is_checkpoint_file(pretrained) or name.startswith(SCHEMAS):
        return {}
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"model.backbone.pretrained={pretrained!r} is neither a checkpoint file nor an open_clip "
                         f"tag of {name} (tags: {', '.join(tags) or 'none'})")
    return cfg


def resolve_quick_gelu(name: str, pretrained: str | None, quick_gelu: bool | None = None) -> bool:
    """The activation to build: QuickGELU (True) or GELU (False), following the weights (module doc).

    Raises ValueError on a forced mismatch with the pretrained tag."""
    built = bool(model_config(name).get("quick_gelu", False))           # what the model config builds
    tag = pretrained_tag_cfg(name, pretrained)
    trained = tag.get("quick_gelu", False) if tag else None             # what the tag's weights need
    if trained is not None:
        if built and not trained:
            raise ValueError(f"model.backbone.name={name!r} builds QuickGELU but pretrained={pretrained!r} was "
                             f"trained with GELU; use {name.removesuffix('-quickgelu')!r}")
        if quick_gelu is not None and quick_gelu != trained:
            raise ValueError(f"model.backbone.quick_gelu={quick_gelu} contradicts pretrained={pretrained!r}, "
                             f"whose weights were trained with {'QuickGELU' if trained else 'GELU'}; "
                             "leave model.backbone.quick_gelu unset (null)")
        return trained
    if quick_gelu is not None:
        if built and not quick_gelu:
            raise ValueError(f"model.backbone.quick_gelu=false but {name!r} is a QuickGELU config; "
                             f"use {name.removesuffix('-quickgelu')!r}")
        return quick_gelu
    return built


def download_tag(tag_cfg: dict) -> str:
    """Local file of an open_clip pretrained tag (open_clip's download cache; needs a network once)."""
    return open_clip.download_pretrained(tag_cfg)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """An open_clip-format checkpoint file -> its state dict (CPU; ``weights_only``, so no code runs).

    Accepts what open_clip's ``load_state_dict`` accepts: a state dict, ``{"state_dict": ...}``,
    DDP ``module.`` prefixes, safetensors; tensors saved on the meta device stay on it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.backbone.pretrained: checkpoint file {path} does not exist")
    try:
        return open_clip.factory.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle / safetensors errors of many kinds)
        raise ValueError(f"model.backbone.pretrained: {path} is not an open_clip checkpoint "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def load_checkpoint_into(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load an open_clip-format checkpoint file into an open_clip CLIP ``model`` (open_clip's own
    conversions: OpenAI JIT / old text layouts, position-embedding resizing), with one clear error
    when the weights do not fit the architecture."""
    read_checkpoint(path)                                                # clear errors first
    try:
        open_clip.factory.load_checkpoint(model, str(path), strict=strict, weights_only=True)
    except (RuntimeError, AssertionError, KeyError) as err:  # open_clip's size checks assert
        err = err if str(err) else type(err)(type(err).__name__)
        raise ValueError(f"model.backbone.pretrained: {path} does not fit this architecture "
                         f"({str(err).splitlines()[0][:300]}); check model.backbone.name") from None


def create_clip(name: str, pretrained: str | None = None, *, quick_gelu: bool | None = None,
                device: str | torch.device | None = None, image_size: int = 0) -> nn.Module:
    """Build an open_clip CLIP model with the activation its weights need (module docstring).

    No network access unless ``pretrained`` is a remote tag or ``name`` an hf-hub: name.
    ``device="meta"`` builds the architecture without memory (checkpoint tensors saved on meta load).
    ``image_size`` > 0 overrides the vision input size (position embedding resized on load).
    """
    size = {"force_image_size": image_size} if image_size else {}
    register_tvr_model_configs()
    if name.startswith(SCHEMAS):
        if pretrained:
            raise ValueError(f"model.backbone.pretrained={pretrained!r} must be empty with name={name!r}: "
                             "the weights come from the hub / folder")
        built = bool(model_config(name).get("quick_gelu", False))       # clear error first
        if quick_gelu is not None and quick_gelu != built:
            raise ValueError(f"model.backbone.quick_gelu={quick_gelu} contradicts {name}'s own config "
                             f"(quick_gelu={built}); leave model.backbone.quick_gelu unset (null)")
        return open_clip.create_model(name, device=device or "cpu", **size)
    qg = resolve_quick_gelu(name, pretrained, quick_gelu)
    tag = pretrained_tag_cfg(name, pretrained)
    checkpoint = download_tag(tag) if tag else pretrained
    if checkpoint and not tag and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"model.backbone.pretrained: checkpoint file {checkpoint} does not exist")
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            model = open_clip.create_model(name, force_quick_gelu=qg, device="meta", **size)
    else:
        model = open_clip.create_model(name, force_quick_gelu=qg, device=device or "cpu", **size)
    if checkpoint:
        load_checkpoint_into(model, checkpoint)
    if tag:  # the tag's preprocessing, as open_clip.create_model sets it
        from open_clip.model import set_model_preprocess_cfg
        from open_clip.transform import merge_preprocess_dict

        set_model_preprocess_cfg(model, merge_preprocess_dict(
            {"size": model.visual.image_size, "mean": open_clip.OPENAI_DATASET_MEAN,
             "std": open_clip.OPENAI_DATASET_STD}, tag))
    return model


class ClipBackbone(nn.Module):
    """open_clip CLIP model with per-frame, per-patch and per-word outputs."""

    def __init__(self, cfg: BackboneCfg, model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.clip = model if model is not None else create_clip(cfg.name, cfg.pretrained,
                                                                          quick_gelu=cfg.quick_gelu,
                                                                          image_size=cfg.image_size)
        if not hasattr(self.clip, "visual") or not hasattr(self.clip.visual, "transformer"):
            raise ValueError(f"model.backbone.name={cfg.name!r}: tvr supports open_clip ViT models only")
        if cfg.grad_checkpointing:
            self.clip.set_grad_checkpointing(True)
        self.tokenizer = get_tokenizer(cfg.name)

    # -- static facts ---------------------------------------------------------------------------
    @property
    def text_tower(self) -> nn.Module:
        """The module holding token_embedding .. text_projection (CLIP itself, or CustomTextCLIP.text)."""
        return getattr(self.clip, "text", self.clip)

    @property
    def embed_dim(self) -> int:
        proj = self.text_tower.text_projection
        return int(proj.out_features) if isinstance(proj, nn.Linear) else int(proj.shape[1])

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def context_length(self) -> int:
        return int(self.text_tower.context_length)

    @property
    def image_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (tuple(self.clip.visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
                tuple(self.clip.visual.image_std or open_clip.OPENAI_DATASET_STD))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def tokenize(self, texts: list[str]) -> Tensor:
        """(N,) strings -> (N, L) token ids (padded with 0, truncated with EOS kept)."""
        return self.tokenizer(texts)

    # -- video tower ----------------------------------------------------------------------------
    def encode_frames(self, frames: Tensor, patches: bool = False) -> tuple[Tensor, Tensor | None]:
        """frames (B, T, 3, H, W) -> CLS (B, T, D) and, if asked, patch tokens (B, T, P, D)."""
        B, T = frames.shape[:2]
        images = frames.flatten(0, 1)                                    # (B*T, 3, H, W)
        visual = self.clip.visual
        if not patches:
            cls = self.clip.encode_image(images)                         # (B*T, D)
            return cls.view(B, T, -1), None
        visual.output_tokens = True
        try:
            cls, tokens = visual(images)                                 # (B*T, D), (B*T, P, width)
        finally:
            visual.output_tokens = False
        if visual.proj is not None:
            tokens = tokens @ visual.proj                                # (B*T, P, D)
        return cls.view(B, T, -1), tokens.view(B, T, tokens.shape[1], -1)

    # -- text tower -----------------------------------------------------------------------------
    def encode_text(self, text: Tensor, tokens: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """text ids (B, L) -> sentence (B, D), word tokens (B, L, D) or None, mask (B, L) bool.

        The sentence feature is open_clip's own ``encode_text`` (EOS pooling); word tokens are
        the same final-layer states after ``ln_final`` and ``text_projection``.
        """
        mask = text != 0                                                 # (B, L)
        if not tokens:
            return self.clip.encode_text(text), None, mask
        states = self.text_states(text)                                  # (B, L, width)
        words = self.project_text(states)                                # (B, L, D)
        eos = words[torch.arange(text.shape[0], device=text.device), text.argmax(dim=-1)]
        return eos, words, mask

    def text_states(self, text: Tensor) -> Tensor:
        """Final-layer text states after ``ln_final``: (B, L) ids -> (B, L, width)."""
        c = self.text_tower
        cast_dtype = c.transformer.get_cast_dtype()
        x = c.token_embedding(text).to(cast_dtype)                       # (B, L, width)
        x = x + c.positional_embedding.to(cast_dtype)
        x = c.transformer(x, attn_mask=c.attn_mask)
        return c.ln_final(x)

    def project_text(self, states: Tensor) -> Tensor:
        proj = self.text_tower.text_projection
        return proj(states) if isinstance(proj, nn.Linear) else states @ proj


def set_trainable(module: nn.Module, patterns: list[str], trainable: bool) -> list[str]:
    """Freeze or unfreeze every parameter whose name matches one of the glob ``patterns``.

    Returns the matched names, so callers can check that a pattern matched something.
    """
    matched = [n for n, _ in module.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    for name, p in module.named_parameters():
        if name in matched:
            p.requires_grad_(trainable)
    return matched
