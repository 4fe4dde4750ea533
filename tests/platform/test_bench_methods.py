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
