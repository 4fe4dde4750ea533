"""`tvr bench methods` plumbing without training: every variant resolves to a valid job whose method
builds, the table aggregates mean ± std per variant, and the two-stage recall numbers are right."""

from __future__ import annotations

import statistics

import pytest
import torch

from tvr_platform.bench.methods import (
    VARIANTS,
    markdown_table,
    resolve_overrides,
    trainable_params,
    two_stage_recall,
)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label)
def test_every_variant_is_a_valid_job_with_the_shared_budget(variant, tmp_path):
    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method
    from tvr_platform.config import load_job

    job = load_job(None, resolve_overrides(variant, 2, tmp_path, ["train.epochs=1"]))
    assert job.run.seed == 2 and job.train.epochs == 1 and job.data.num_frames == 4
    assert job.tracking.registered_model == "" and job.run.name.startswith("bench-")
    method = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone))
    assert 0 < trainable_params(method) <= sum(p.numel() for p in method.parameters())
    if job.model.method == "vop" or (job.model.method == "excae" and job.model.excae.base == "vop"):
        # VoP trains its prompts on a frozen backbone (logit scale included), as in its paper
        assert not any(p.requires_grad for p in method.backbone.parameters())


def _row(label, seed, r1, wall, params=100, two=None):
    metrics = {"t2v_R1": r1, "t2v_R5": 50.0, "t2v_R10": 80.0, "t2v_MnR": 3.0, "v2t_R1": 10.0, "v2t_R5": 40.0}
    row = {"variant": label, "seed": seed, "metrics": metrics, "trainable_params": params,
           "total_params": 1000 * params, "wall_s": wall}
    if two:
        row["two_stage"] = two
    return row


def test_markdown_table_mean_and_sample_std_over_seeds():
    two = {"candidates": 5, "clips": 12, "exhaustive_R1": 50.0, "two_stage_R1": 40.0, "exhaustive_R5": 90.0,
           "two_stage_R5": 80.0, "topk_kept": 0.75}
    rows = [_row("X-Pool", s, r1, w, 1234, two) for s, r1, w in ((0, 10.0, 5.0), (1, 20.0, 7.0), (2, 30.0, 9.0))]
    rows.append(_row("meanP (CLIP4Clip)", 0, 5.0, 3.0))
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| method | seeds | t2v_R1") and "| trainable % |" in lines[0]
    assert lines[2].startswith("| meanP (CLIP4Clip) | 1 | 5.0 |")             # VARIANTS order
    sd = statistics.stdev([10.0, 20.0, 30.0])
    assert lines[3].startswith(f"| X-Pool | 3 | 20.0 ± {sd:.1f} |") and "| 1,234 | 0.1 |" in lines[3]
    assert "| 7.0 ± 2.0 |" in lines[3]                                         # wall time
    assert "| X-Pool | 5 / 12 | 50.0 ± 0.0 | 40.0 ± 0.0 | 90.0 ± 0.0 | 80.0 ± 0.0 | 75.0 ± 0.0% |" in table


def test_two_stage_recall_counts_hits_and_equals_exhaustive_when_keeping_all():
    from tvr.backbone import BackboneCfg, ClipBackbone
    from tvr.methods import METHODS, build_method

    torch.manual_seed(0)
    method = build_method("meanp", METHODS["meanp"].config_cls(), ClipBackbone(BackboneCfg(name="tvr-tiny"))).eval()
    g = torch.Generator().manual_seed(3)
    text = {"text": torch.randn(9, 32, generator=g)}
    video = {"video": torch.randn(6, 32, generator=g)}
    caption_video = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    out = two_stage_recall(method, text, video, caption_video, fraction=1.0)    # keeps all 6 clips
    sims = torch.nn.functional.normalize(text["text"], dim=-1) @ torch.nn.functional.normalize(video["video"], dim=-1).t()
    rank1 = sims.argmax(dim=1)
    assert out["exhaustive_R1"] == pytest.approx(100 * (rank1 == caption_video).double().mean().item())
    assert out["two_stage_R1"] == out["exhaustive_R1"] and out["two_stage_R5"] == out["exhaustive_R5"]
    assert out["topk_kept"] == 1.0 and out["candidates"] == 6


def _meanp():
    from tvr.backbone import BackboneCfg, ClipBackbone
    from tvr.methods import METHODS, build_method

    torch.manual_seed(0)
    return build_method("meanp", METHODS["meanp"].config_cls(), ClipBackbone(BackboneCfg(name="tvr-tiny"))).eval()


def test_per_type_metrics_and_twin_accuracy_match_a_float64_reference():
    from tvr_platform.bench.methods import per_type_metrics, twin_index

    g = torch.Generator().manual_seed(7)
    n_v, ids = 7, [f"video{i}" for i in (0, 1, 2, 3, 4, 5, 8)]        # video8's twin (video9) is not in the split
    twins = twin_index(ids)
    assert twins == [1, 0, 3, 2, 5, 4, -1]
    caption_video = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 1])         # video 2 has no static caption
    types = ["temporal", "static", "temporal", "static", "temporal", "static", "temporal", "temporal",
             "temporal", "static", "static"]
    text = {"text": torch.randn(len(types), 32, generator=g)}
    video = {"video": torch.randn(n_v, 32, generator=g)}
    video["video"][1] = video["video"][0]                            # a tie between twins counts one half
    method = _meanp()
    from tvr_platform.report.scoring import evaluate_method

    _, ranks = evaluate_method(method, text, video, caption_video, block=4, dsl=False, sinkhorn_iters=0)
    out = per_type_metrics(method, text, video, caption_video, types, twins, ranks.t2v)
    t = torch.nn.functional.normalize(text["text"].double(), dim=-1)
    v = torch.nn.functional.normalize(video["video"].double(), dim=-1)
    sims = t @ v.t()
    for kind in ("static", "temporal"):
        idx = [j for j, k in enumerate(types) if k == kind]
        # tvr.metrics' tie rule: a tied clip with a lower index ranks first
        ranks = [int((sims[j] > sims[j, caption_video[j]] + 1e-12).sum()
                     + ((sims[j] - sims[j, caption_video[j]]).abs() <= 1e-12)[:caption_video[j]].sum()) + 1
                 for j in idx]
        assert out[f"{kind}_t2v_R1"] == pytest.approx(100 * sum(r == 1 for r in ranks) / len(idx))
        assert out[f"{kind}_t2v_R5"] == pytest.approx(100 * sum(r <= 5 for r in ranks) / len(idx))
        assert out[f"{kind}_t2v_MnR"] == pytest.approx(sum(ranks) / len(idx))
    wins = []
    for j in (j for j, k in enumerate(types) if k == "temporal" and twins[int(caption_video[j])] >= 0):
        a, b = sims[j, caption_video[j]], sims[j, twins[int(caption_video[j])]]
        wins.append(1.0 if a > b + 1e-12 else 0.5 if abs(a - b) <= 1e-12 else 0.0)
    assert 0.5 in wins and len(wins) == 5                           # video8's caption has no twin
    assert out["temporal_twin_acc"] == pytest.approx(100 * sum(wins) / len(wins))


def test_caption_types_follow_the_evaluation_order_of_the_manifest(tmp_path):
    from tvr.data.synthetic import synthesize
    from tvr_platform.bench.methods import caption_types
    from tvr_platform.config import load_job
    from tvr_platform.data.pipeline import load_manifest

    res = synthesize(tmp_path, num_clips=8, seconds=1.0, size=32, captions="mixed", seed=2)
    for mode in ("all", "first"):
        job = load_job(None, [f"data.root={tmp_path}", f"data.eval_captions={mode}"])
        manifest = load_manifest(job, "test")
        types = caption_types(job, manifest)
        caps, vids = manifest.first_captions() if mode == "first" else (manifest.captions, manifest.caption_video)
        assert len(types) == len(caps) and set(types) <= {"static", "temporal"}
        for c, v, t in zip(caps, vids, types, strict=True):
            vid = manifest.video_ids[v]
            assert res.caption_types[vid][res.captions[vid].index(c)] == t


def test_only_selects_an_exact_label_alone_or_every_label_containing_it():
    from tvr_platform.bench.methods import select_variants

    assert [v.label for v in select_variants(["meanP (CLIP4Clip)"])] == ["meanP (CLIP4Clip)"]
    assert {v.label for v in select_variants(["vop-"])} == {"VoP-P", "VoP-C", "VoP-F"}
    with pytest.raises(ValueError, match="matches none"):
        select_variants(["nope"])


def test_every_variant_starts_from_the_given_backbone_except_the_random_init_reference(tmp_path):
    from tvr_platform.bench.methods import LR_SPLITS
    from tvr_platform.config import load_job

    ckpt = tmp_path / "open_clip_model.pt"
    ckpt.write_bytes(b"")
    for variant in VARIANTS:
        job = load_job(None, resolve_overrides(variant, 0, tmp_path, [], str(ckpt)))
        assert job.data.synth.captions == "mixed" and job.dataset_uri.endswith("datasets/synthetic-mixed")
        if "random init" in variant.label:
            assert job.model.backbone.pretrained is None
        else:
            assert job.model.backbone.pretrained == str(ckpt)
            # ExCae over X trains with X's split, so the row differs from X's only by ExCae
            paper = job.model.excae.base if variant.label.startswith("ExCae over") else job.model.method
            assert (job.train.lr, job.train.backbone_lr) == LR_SPLITS[paper]
            assert job.train.lr > job.train.backbone_lr                # each paper's split: small backbone lr


def test_markdown_table_has_the_per_caption_type_breakdown():
    rows = []
    for seed, (s1, t1) in enumerate(((40.0, 10.0), (50.0, 20.0))):
        row = _row("X-Pool", seed, 20.0, 5.0)
        row["metrics"].update({"static_t2v_R1": s1, "static_t2v_R5": 80.0, "temporal_t2v_R1": t1,
                               "temporal_t2v_R5": 30.0, "temporal_twin_acc": 50.0})
        rows.append(row)
    table = markdown_table(rows)
    assert "| method | static R1 | static R5 | temporal R1 | temporal R5 | twin acc |" in table
    sd = statistics.stdev([40.0, 50.0])
    assert f"| X-Pool | 45.0 ± {sd:.1f} | 80.0 ± 0.0 | 15.0 ± {sd:.1f} | 30.0 ± 0.0 | 50.0 ± 0.0 |" in table


def test_global_text_embedding_reads_a_wrapped_ucofia_sentence():
    """ExCae over UCoFIA names its text feature base.sentence: the two-stage row of the benchmark
    (and tvr search's coarse stage) read it instead of failing."""
    from tvr_platform.report.core import global_text_embedding

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    out = global_text_embedding({"base.sentence": x, "base.words": torch.randn(3, 4, 8), "base.word_mask": torch.ones(3, 4)})
    assert torch.allclose(out, torch.nn.functional.normalize(x, dim=-1))
