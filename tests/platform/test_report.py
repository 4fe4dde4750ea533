"""Evaluation report: schema and values on a hand-built similarity matrix (checked against plain
float64 loops), and the PNG plots written non-empty."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tvr.metrics import ranks_from_matrix
from tvr_platform.report import (
    REPORT_SCHEMA,
    build_report,
    global_embeddings,
    modality_gap,
    sample_similarity,
    write_plots,
)
from tvr_platform.report.plots import PLOTS

# 5 captions of 4 videos (video 3 has two captions); rows = captions, columns = videos.
SIMS = torch.tensor([[0.9, 0.1, 0.2, 0.3],
                     [0.8, 0.7, 0.1, 0.0],
                     [0.1, 0.2, 0.3, 0.6],
                     [0.5, 0.4, 0.35, 0.2],
                     [0.0, 0.1, 0.9, 0.8]])
G = torch.tensor([0, 1, 2, 3, 3])


def loop_ranks(s: np.ndarray, g: list[int]) -> tuple[list[int], list[int]]:
    """Ranks by plain counting (SIMS has no ties within a row or column)."""
    t2v = [1 + sum(s[i, j] > s[i, g[i]] for j in range(s.shape[1])) for i in range(s.shape[0])]
    v2t = []
    for v in range(s.shape[1]):
        v2t.append(min(1 + sum(s[t, v] > s[p, v] for t in range(s.shape[0])) for p in range(len(g)) if g[p] == v))
    return t2v, v2t


def test_hand_built_matrix_ranks_are_what_counting_gives():
    t2v, v2t = loop_ranks(SIMS.double().numpy(), G.tolist())
    assert t2v == [1, 2, 2, 4, 2] and v2t == [1, 1, 3, 1]
    ranks = ranks_from_matrix(SIMS, G, v2t_rank="texts")  # loop_ranks counts competing texts
    assert ranks.t2v.tolist() == t2v and ranks.v2t.tolist() == v2t
    # the published protocol counts competing videos: for video 2 only video 3's captions beat it
    assert ranks_from_matrix(SIMS, G).v2t.tolist() == [1, 1, 2, 1]


def test_report_schema_and_values():
    ranks = ranks_from_matrix(SIMS, G, v2t_rank="texts")  # loop_ranks counts competing texts
    meta = {"target": "hand-built", "num_texts": 5, "num_videos": 4}
    sim = sample_similarity(lambda ti, vi: SIMS[ti][:, vi], G, n=3)
    report = build_report(ranks, meta, similarity=sim)
    json.loads(json.dumps(report))                         # plain JSON, no tensors
    assert report["schema"] == REPORT_SCHEMA and report["meta"] == meta
    assert set(report) == {"schema", "meta", "metrics", "recall_curve", "rank_histogram", "similarity_sample"}

    t2v = np.array([1, 2, 2, 4, 2], dtype=np.float64)
    v2t = np.array([1, 1, 3, 1], dtype=np.float64)
    m = report["metrics"]
    assert m["t2v_R1"] == pytest.approx(20.0) and m["t2v_R5"] == pytest.approx(100.0)
    assert m["t2v_MdR"] == pytest.approx(np.median(t2v)) and m["t2v_MnR"] == pytest.approx(t2v.mean())
    assert m["v2t_R1"] == pytest.approx(75.0) and m["v2t_MnR"] == pytest.approx(v2t.mean())

    rc = report["recall_curve"]
    assert rc["k"] == list(range(1, 11))                  # at least K = 1..10
    expect = [100.0 * np.mean(t2v <= k) for k in rc["k"]]
    assert rc["t2v"] == pytest.approx(expect)
    assert rc["v2t"] == pytest.approx([100.0 * np.mean(v2t <= k) for k in rc["k"]])
    assert rc["t2v"][0] == pytest.approx(m["t2v_R1"]) and rc["t2v"][4] == pytest.approx(m["t2v_R5"])

    h = report["rank_histogram"]
    assert h["edges"][0] == 1 and len(h["t2v"]) == len(h["edges"]) - 1
    assert sum(h["t2v"]) == 5 and sum(h["v2t"]) == 4
    assert h["t2v"][:4] == [1, 3, 0, 1] and h["v2t"][:3] == [3, 0, 1]     # unit bins at ranks 1, 2, 3, 4

    s = report["similarity_sample"]
    assert s["videos"] == [0, 1, 2] and s["texts"] == [0, 1, 2]   # each video's first caption
    np.testing.assert_allclose(s["matrix"], SIMS[:3, :3].numpy(), rtol=1e-6)


def test_histogram_bins_cover_large_ranks():
    ranks = ranks_from_matrix(torch.randn(300, 300, generator=torch.Generator().manual_seed(0)))
    h = build_report(ranks, {})["rank_histogram"]
    assert h["edges"][-1] >= 300 and sum(h["t2v"]) == 300 and sum(h["v2t"]) == 300
    assert all(b > a for a, b in zip(h["edges"], h["edges"][1:]))


def test_modality_gap_and_pca_match_numpy():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(40, 6, generator=g) + 2.0            # a shifted cone: a real gap
    video = torch.randn(30, 6, generator=g) - 1.0
    out = modality_gap(text, video)
    t = text.double().numpy()
    v = video.double().numpy()
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert out["gap"] == pytest.approx(np.linalg.norm(t.mean(0) - v.mean(0)), rel=1e-9)
    assert out["mean_cos_text_video"] == pytest.approx((t @ v.T).mean(), rel=1e-9)
    x = np.concatenate([t, v])
    xc = x - x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xc.T))
    axes = evecs[:, ::-1][:, :2].T                          # leading two
    axes *= np.sign(axes[np.arange(2), np.abs(axes).argmax(1)])[:, None]
    coords = xc @ axes.T
    got = np.array(out["pca"]["text"] + out["pca"]["video"])
    np.testing.assert_allclose(got, coords, atol=1e-5)
    np.testing.assert_allclose(out["pca"]["explained_variance_ratio"], evals[::-1][:2] / evals.sum(), rtol=1e-5)


def test_global_embeddings_pool_per_frame_features():
    text = {"text": torch.randn(3, 4), "key": torch.zeros(3, 8)}
    frames = torch.randn(2, 5, 4)
    t, v = global_embeddings(text, {"frames": frames})
    assert torch.allclose(v, torch.nn.functional.normalize(frames.mean(1), dim=-1))
    assert torch.allclose(t.norm(dim=-1), torch.ones(3))
    with pytest.raises(KeyError, match="no global video embedding"):
        global_embeddings(text, {"experts_only": torch.randn(2, 4)})


def test_plots_written_and_non_empty(tmp_path):
    import matplotlib.image

    ranks = ranks_from_matrix(SIMS, G, v2t_rank="texts")  # loop_ranks counts competing texts
    gap = modality_gap(torch.randn(5, 4), torch.randn(4, 4))
    report = build_report(ranks, {}, similarity=sample_similarity(lambda ti, vi: SIMS[ti][:, vi], G, 4), gap=gap)
    paths = write_plots(report, tmp_path)
    assert sorted(p.name for p in paths) == sorted(PLOTS)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01, f"{p.name} is blank"    # something was drawn


def test_plot_chance_lines_titles_and_diagonal(tmp_path, monkeypatch):
    """The chance curves are the random-score expectations (float64 simulation), titles name the
    model and split, the heatmap marks its diagonal; learning curves are written."""
    from tvr_platform.report import plots
    from tvr_platform.runs import chance_level

    # survival of the first true item's rank vs a simulation: 9 items, 3 true
    rng = np.random.default_rng(1)
    scores = rng.random((40000, 9))
    best_true = (scores > scores[:, :3].max(1, keepdims=True)).sum(1) + 1
    for r in (1, 2, 4, 7):
        assert plots.first_true_survival(r, 9, 3) == pytest.approx((best_true >= r).mean(), abs=0.01)
    assert 100 * (1 - plots.first_true_survival(3, 24, 1)) == pytest.approx(chance_level("t2v_R2", 24))

    drawn = {}
    real_subplots = plots._pyplot().subplots

    def spy(*a, **k):
        fig, ax = real_subplots(*a, **k)
        drawn.setdefault("figs", []).append(fig)
        return fig, ax

    monkeypatch.setattr(plots._pyplot(), "subplots", spy)
    ranks = ranks_from_matrix(SIMS, G)
    meta = {"model": "m", "model_version": "3", "method": "meanp", "split": "test", "num_videos": 4, "num_texts": 5}
    report = build_report(ranks, meta, similarity=sample_similarity(lambda ti, vi: SIMS[ti][:, vi], G, 4))
    write_plots(report, tmp_path)
    recall_fig, rank_fig, heat_fig = drawn["figs"]
    recall_ax = recall_fig.axes[0]
    assert recall_ax.get_title() == "Recall@K: m v3 (meanp), split test"
    chance = {line.get_label(): line.get_ydata() for line in recall_ax.get_lines()}
    np.testing.assert_allclose(chance["t2v chance"][:2], [25.0, 50.0])
    assert "m v3 (meanp), split test" in rank_fig._suptitle.get_text()
    assert [p.get_label() for p in rank_fig.axes[0].patches] == ["ranks", "chance"]
    assert [c.get_label() for c in heat_fig.axes[0].collections] == ["positive pair"]
    np.testing.assert_array_equal(heat_fig.axes[0].collections[0].get_offsets(), [[i, i] for i in range(4)])

    out = plots.learning_curves({"train_loss": [(1, 2.0), (2, 1.5)], "val/t2v_R1": [(2, 30.0)]}, "run x",
                                tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
