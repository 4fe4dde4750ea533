"""The paper recipes (``jobs/repro/*.yaml``) load, ship and run at their real size.

Every recipe is built with its real backbone (ViT-B/32 or ViT-B/16, random weights read from an
open_clip-format checkpoint file written here, QuickGELU as OpenAI's) and its real method options
(T-MASS M = 20 samples, UCoFIA 500 perturbed top-K samples and its per-granularity SK with the
official bank form, VoP F+C prompts, ExCae 16 experts + 70-token cut ...), then runs one training
step (the method's param groups, AdamW, the platform's warm-up/cosine schedule) and one evaluation
(the platform's ``evaluate_method``, with the recipe's eval settings) on a down-scaled input: 2 clips
x 2 frames of 64 x 64 (``model.backbone.image_size=64``: the 224 checkpoint's position embedding is
resized on load), 1 auxiliary caption. The same recipes' methods are also built on ViT-bigG-14 on
the meta device (no memory).
No Ray: the method table is called directly, as the training worker does.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import open_clip
import pytest
import torch

from tvr.backbone import ClipBackbone, create_clip
from tvr.methods import build_method
from tvr_platform.config import load_job
from tvr_platform.evaluation import own_sinkhorn
from tvr_platform.report.scoring import evaluate_method
from tvr_platform.specs import resolve_spec, shipped
from tvr_platform.train.step import RetrievalStep
from tvr_platform.train.strategy import lr_lambda

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "jobs" / "repro").glob("*.yaml"))
CAPTIONS = ["a man is cooking pasta in a kitchen", "a red car drives fast on a wet road"]
AUX = [["someone stirs a pot"], ["rain on the street"]]               # K = 1 auxiliary caption per clip
FRAMES = 2
SIZE = 64                     # model.backbone.image_size: B/32 sees 2 x 2 patches, B/16 4 x 4 (real: 224)


def test_every_published_row_has_a_recipe_listed_by_tvr_config_list(capsys, tmp_path, monkeypatch):
    assert [p.stem for p in RECIPES] == ["excae", "meanp", "tmass_b16", "tmass_b32", "ucofia", "vop_base",
                                         "vop_fc", "xpool"]
    monkeypatch.chdir(tmp_path)                                            # outside a checkout
    names = shipped()
    assert all(f"repro/{p.stem}" in names for p in RECIPES)
    assert resolve_spec("jobs/repro/xpool.yaml") == resolve_spec("repro/xpool") == names["repro/xpool"]
    from tvr_platform.cli import main

    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out
    for p in RECIPES:
        line = next(line for line in listed.splitlines() if f"repro/{p.stem} " in line)
        assert "Paper recipe:" in line


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_value_names_its_source(path):
    """Each leaf value carries a comment (paper section or official file / command line)."""
    bare = [line for line in path.read_text().splitlines()
            if re.match(r"^\s+\w+: \S", line) and "#" not in line
            and not re.match(r"^\s+(name|experiment|use_gpu|strategy|eval_batch_size|format|eval_every|"
                             r"num_workers|precision|checkpoints_to_keep|eval_captions|aggregation|bi_isa_order|method): ", line)]
    assert not bare, f"{path.name}: values without a source comment: {bare}"
    job = load_job(path)
    assert job.data.train_split == "train.9k" and job.data.test_split == "test" and job.data.eval_captions == "first"
    assert job.model.backbone.pretrained == "openai" and job.train.use_gpu


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Per ViT-B model the recipes name: a random-weight open_clip checkpoint file (QuickGELU, as
    OpenAI's) and the backbone the recipe's own ``model.backbone`` section builds from it (built once,
    copied per recipe: methods freeze or wrap their backbone)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name in sorted({load_job(p).model.backbone.name for p in RECIPES}):
        torch.manual_seed(0)
        path = folder / f"{name}.pt"
        reference = open_clip.create_model(name, force_quick_gelu=True)
        torch.save(reference.state_dict(), path)
        recipe = next(p for p in RECIPES if load_job(p).model.backbone.name == name)
        backbone = ClipBackbone(down_scaled(recipe, path).model.backbone)
        assert torch.equal(backbone.clip.visual.proj, reference.visual.proj)   # the file's weights
        grid = SIZE // reference.visual.patch_size[0]                          # 224 embedding resized
        assert backbone.clip.visual.positional_embedding.shape[0] == grid * grid + 1 < \
            reference.visual.positional_embedding.shape[0]
        assert backbone.clip.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
        out[name] = (path, backbone)
        del reference
    return out


def down_scaled(path: Path, checkpoint: Path | None = None, name: str | None = None):
    job = load_job(path)
    overrides = [f"data.num_frames={FRAMES}", f"model.backbone.image_size={SIZE}"]
    if hasattr(job.method_cfg, "num_frames"):
        overrides.append(f"model.{job.model.method}.num_frames={FRAMES}")
    if checkpoint is not None:
        overrides += [f"model.backbone.pretrained={checkpoint}", "model.backbone.quick_gelu=true"]
    if name is not None:
        overrides.append(f"model.backbone.name={name}")
    return load_job(path, overrides)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_one_step_and_evaluates_at_real_size(path, backbones):
    checkpoint, built = backbones[load_job(path).model.backbone.name]
    job = down_scaled(path, checkpoint)
    assert job.model.backbone == built.cfg                                # the recipe's backbone, from the file
    torch.manual_seed(job.run.seed)
    backbone = copy.deepcopy(built)
    assert backbone.image_size == SIZE and backbone.embed_dim == 512
    method = build_method(job.model.method, job.method_cfg, backbone)
    step = RetrievalStep(method, gather=lambda x: x)

    ids = backbone.tokenize(CAPTIONS)                                      # (2, 77)
    frames = torch.randn(len(CAPTIONS), FRAMES, 3, SIZE, SIZE)             # (B, T, 3, H, W)
    aux = torch.stack([backbone.tokenize(a) for a in AUX]) if job.data.aux_captions else None  # (B, K, 77)

    # -- one training step, as the worker builds it -------------------------------------------------
    groups = method.param_groups(job.train.lr, job.train.backbone_lr, job.train.weight_decay)
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(job.train.warmup_steps, 100 * job.train.warmup_steps))
    trained = [p for g in groups for p in g["params"]]
    before = [p.detach().clone() for p in trained]
    method.train()
    out = step("loss", frames=frames, text=ids, captions=aux)
    assert math.isfinite(out["loss"].item())
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(trained, job.train.grad_clip)
    opt.step()
    sched.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trained)), "the step moved nothing"

    # -- one evaluation, with the recipe's evaluation settings ---------------------------------------
    method.eval()
    with torch.no_grad():
        text = step("text", text=ids)
        video = step("video", frames=frames, captions=aux)
        own = own_sinkhorn(method)
        iters = getattr(job.method_cfg, "sinkhorn_iters", None) if own else job.eval.sinkhorn_iters
        bank = step("text", text=backbone.tokenize(CAPTIONS + ["a dog", "two cats"])) \
            if own and iters and job.eval.sinkhorn_bank == "train" else None
        metrics, _ = evaluate_method(method, text, video, torch.arange(len(CAPTIONS)), block=job.eval.block_size,
                                     dsl=job.eval.dsl, sinkhorn_iters=iters, v2t_rank=job.eval.v2t_rank,
                                     dsl_v2t=job.eval.dsl_v2t, bank_text=bank)
    assert {"t2v_R1", "v2t_R1", "t2v_MnR"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", ["ViT-bigG-14"])
def test_recipes_build_on_large_backbones_on_meta(name):
    """Every recipe's method options also fit the largest ViT (width 1280; L/14 .. H/14 lie between),
    built without memory. (Checkpoint files for every ViT B/32 .. bigG-14: tests/tvr/test_backbone.py.)"""
    clip = create_clip(name, None, quick_gelu=True, device="meta")
    for path in RECIPES:
        job = down_scaled(path, name=name)
        with torch.device("meta"):
            method = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone, model=clip))
        assert method.backbone.embed_dim == 1280
        assert all(p.is_meta for p in method.parameters())


def test_backbone_image_size_reaches_the_data_pipeline_and_zero3_is_refused():
    from tvr_platform.config import ConfigError
    from tvr_platform.data.pipeline import backbone_preprocess

    assert backbone_preprocess("ViT-B-32", "openai")[0] == 224
    assert backbone_preprocess("ViT-B-32", "openai", 112)[0] == 112
    with pytest.raises(ConfigError, match="image_size=112 .*ZeRO-3"):
        load_job(RECIPES[0], ["model.backbone.image_size=112", "train.strategy=deepspeed", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="image_size=-1 must be >= 0"):
        load_job(None, ["model.backbone.image_size=-1"])
