"""Backbones: the activation follows the weights (QuickGELU for OpenAI tags), hf-hub: / local-dir:
names, open_clip-format checkpoints for every ViT from B/32 to bigG-14 (the big ones on meta)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from tvr import backbone as bb
from tvr.backbone import BackboneCfg, ClipBackbone, create_clip, read_checkpoint

VITS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14")


def activations(model: nn.Module) -> set[type]:
    """Classes of the MLP activations of every residual block, both towers."""
    return {type(m.mlp.gelu) for m in model.modules() if hasattr(m, "mlp") and hasattr(m.mlp, "gelu")}


def meta_checkpoint(tmp_path, name: str, quick_gelu: bool = False):
    with torch.device("meta"):
        model = open_clip.create_model(name, force_quick_gelu=quick_gelu, device="meta")
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_openai_tag_builds_quick_gelu(tmp_path, monkeypatch, name):
    ckpt = meta_checkpoint(tmp_path, name, quick_gelu=True)
    monkeypatch.setattr(bb, "download_tag", lambda cfg: str(ckpt))
    model = create_clip(name, "openai", device="meta")
    assert activations(model) == {QuickGELU}
    assert activations(create_clip(name, None, device="meta")) == {nn.GELU}           # plain config: GELU
    gelu_tag = next(t for t in open_clip.list_pretrained_tags_by_model(name)
                    if not open_clip.get_pretrained_cfg(name, t).get("quick_gelu"))   # e.g. laion2b_*
    monkeypatch.setattr(bb, "download_tag", lambda cfg: str(meta_checkpoint(tmp_path, name)))
    assert activations(create_clip(name, gelu_tag, device="meta")) == {nn.GELU}


@pytest.mark.slow
def test_openai_tag_loads_real_vit_b32_weights_with_quick_gelu(monkeypatch, vit_b32_checkpoint):
    path, state = vit_b32_checkpoint
    monkeypatch.setattr(bb, "download_tag", lambda cfg: str(path))
    backbone = ClipBackbone(BackboneCfg(name="ViT-B-32", pretrained="openai"))
    assert activations(backbone.clip) == {QuickGELU}
    loaded = backbone.clip.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert backbone.image_mean_std == (tuple(tag["mean"]), tuple(tag["std"]))
    # The same file given as a path: the file says nothing about its activation, quick_gelu does.
    assert activations(create_clip("ViT-B-32", str(path), quick_gelu=True)) == {QuickGELU}


@pytest.mark.parametrize(("name", "pretrained", "quick_gelu", "match"), [
    ("ViT-B-32", "openai", False, "quick_gelu=False contradicts pretrained='openai'"),
    ("ViT-L-14", "laion2b_s32b_b82k", True, "trained with GELU"),
    ("ViT-B-32-quickgelu", None, False, "is a QuickGELU config"),
])
def test_forced_activation_mismatch_is_one_clear_error(name, pretrained, quick_gelu, match):
    with pytest.raises(ValueError, match=match):
        BackboneCfg(name=name, pretrained=pretrained, quick_gelu=quick_gelu)
    with pytest.raises(ValueError, match=match):
        create_clip(name, pretrained, quick_gelu=quick_gelu, device="meta")


def test_unknown_tag_is_one_clear_error_at_build():
    with pytest.raises(ValueError, match="neither a checkpoint file nor an open_clip tag of ViT-B-32"):
        create_clip("ViT-B-32", "no-such-tag", device="meta")


def test_mismatch_reaches_the_job_loader_as_one_line():
    from tvr_platform.config import ConfigError, load_job

    with pytest.raises(ConfigError) as err:
        load_job(None, ["model.backbone.name=ViT-B-16", "model.backbone.pretrained=openai",
                        "model.backbone.quick_gelu=false"])
    assert "\n" not in str(err.value) and "quick_gelu" in str(err.value)


@pytest.mark.parametrize("name", VITS)
def test_open_clip_checkpoint_file_for_every_vit_on_meta(tmp_path, name):
    path = meta_checkpoint(tmp_path, name)
    model = create_clip(name, str(path), device="meta")
    state = read_checkpoint(path)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert model.visual.transformer.width == open_clip.get_model_config(name)["vision_cfg"]["width"]


def test_checkpoint_of_another_architecture_is_one_clear_error(tmp_path):
    path = meta_checkpoint(tmp_path, "ViT-B-16")
    with pytest.raises(ValueError, match="does not fit this architecture"):
        create_clip("ViT-L-14", str(path), device="meta")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_clip("ViT-B-32", str(tmp_path / "missing.pt"))
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not an open_clip checkpoint"):
        create_clip("ViT-B-32", str(bad), device="meta")


def _tiny_hub_config() -> dict:
    bb.register_tvr_model_configs()
    return {"model_cfg": {**open_clip.get_model_config("tvr-tiny"), "quick_gelu": True},
            "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


def test_hf_hub_name_builds_from_the_hub_config_and_weights(tmp_path, monkeypatch):
    cfg = _tiny_hub_config()
    torch.manual_seed(3)
    ref = open_clip.create_model("tvr-tiny", force_quick_gelu=True)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), weights)
    asked = []

    def hub_file(model_id, filename="open_clip_pytorch_model.bin", **_):
        asked.append((model_id, filename))
        if filename == "open_clip_config.json":
            (tmp_path / filename).write_text(json.dumps(cfg))
        return str(tmp_path / filename)

    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", hub_file)
    backbone = ClipBackbone(BackboneCfg(name="hf-hub:someone/tiny-clip"))
    assert ("someone/tiny-clip", "open_clip_config.json") in asked
    assert activations(backbone.clip) == {QuickGELU}
    assert all(torch.equal(backbone.clip.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert backbone.tokenize(["a cat"]).shape == (1, cfg["model_cfg"]["text_cfg"]["context_length"])
    with pytest.raises(ValueError, match="must be empty"):
        create_clip("hf-hub:someone/tiny-clip", "openai")


def test_local_dir_name(tmp_path):
    cfg = _tiny_hub_config()
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    ref = open_clip.create_model("tvr-tiny", force_quick_gelu=True)
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model = create_clip(f"local-dir:{tmp_path}")
    assert activations(model) == {QuickGELU}
    assert torch.equal(model.logit_scale, ref.logit_scale)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        create_clip(f"local-dir:{tmp_path / 'nowhere'}")


def test_s3_checkpoint_is_fetched_and_loads(tmp_path, s3_bucket):
    """An open_clip checkpoint at s3:// (the platform downloads it once) builds the same model."""
    import boto3

    from tvr_platform.config import load_job
    from tvr_platform.train.trainer import resolve_pretrained

    endpoint, bucket = s3_bucket
    torch.manual_seed(5)
    ref = open_clip.create_model("tvr-tiny")
    local = tmp_path / "w.pt"
    torch.save(ref.state_dict(), local)
    boto3.client("s3", endpoint_url=endpoint).upload_file(str(local), bucket, "ckpt/tiny.pt")
    job = load_job(None, [f"run.work_dir={tmp_path / 'work'}", "model.backbone.name=tvr-tiny",
                          f"model.backbone.pretrained=s3://{bucket}/ckpt/tiny.pt",
                          f"storage.endpoint_url={endpoint}"])
    path = resolve_pretrained(job)
    model = create_clip("tvr-tiny", path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())
