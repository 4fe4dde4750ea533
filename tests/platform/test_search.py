"""Search: exhaustive vs two-stage on real (tiny, random-init) methods, and the index round trip
(Ray Data build -> resumed build -> search returns the clip whose caption was queried) for a tiny
model trained on the synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods import METHODS, build_method
from tvr_platform.search import Searcher, VideoIndex, topk_overlap

TINY = BackboneCfg(name="tvr-tiny")


def tiny_method(name: str, **cfg):
    torch.manual_seed(0)
    return build_method(name, METHODS[name].config_cls(**cfg), ClipBackbone(TINY)).eval()


def random_index(method, n: int, frames: int = 2) -> VideoIndex:
    g = torch.Generator().manual_seed(1)
    clips = torch.randn(n, frames, 3, 32, 32, generator=g)
    with torch.no_grad():
        feats = method.encode_video(clips)
    return VideoIndex(uri="mem://", meta={"method": type(method).__name__}, ids=[f"video{i}.mp4" for i in range(n)],
                      features=feats)


QUERIES = ["a red circle moves left", "a blue square", "two shapes", "a green triangle appears", "nothing"]


@pytest.mark.parametrize("name,cfg", [("meanp", {}), ("xpool", {}), ("ucofia", {"chunk_size": 8}),
                                      ("tmass", {"num_frames": 2, "num_samples": 3})])
def test_two_stage_keeping_everything_equals_exhaustive(name, cfg):
    method = tiny_method(name, **cfg)
    index = random_index(method, 13)
    searcher = Searcher(method, index, chunk=5)              # chunks of 5: scoring crosses chunk borders
    text = searcher.encode_queries(QUERIES)
    s_ex, r_ex = searcher.search_features(text, top_k=13)
    s_two, r_two = searcher.search_features(text, top_k=13, candidates=13)
    assert torch.equal(r_ex, r_two)
    torch.testing.assert_close(s_ex, s_two)
    assert topk_overlap(r_ex, r_two) == 1.0
    # exhaustive == sorting the method's own full similarity matrix
    with torch.no_grad():
        full = method.similarity(text, index.features)
    assert torch.equal(r_ex, torch.sort(-full, dim=1, stable=True).indices)


def test_two_stage_reranks_only_candidates_and_reports_overlap():
    method = tiny_method("ucofia", chunk_size=8)
    index = random_index(method, 20)
    searcher = Searcher(method, index)
    text = searcher.encode_queries(QUERIES)
    _, r_ex = searcher.search_features(text, top_k=5)
    _, r_two = searcher.search_features(text, top_k=5, candidates=6)
    coarse = searcher.coarse_scores(text)
    for q in range(len(QUERIES)):        # every hit is among the 6 best coarse clips of its query
        allowed = set(torch.sort(-coarse[q], stable=True).indices[:6].tolist())
        assert set(r_two[q].tolist()) <= allowed
    overlap = topk_overlap(r_ex, r_two)
    expect = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(r_ex, r_two)) / (5 * len(QUERIES))
    assert overlap == pytest.approx(expect)
    with pytest.raises(ValueError, match="candidates"):
        searcher.search_features(text, top_k=5, candidates=3)


def test_coarse_stage_is_cosine_of_global_embeddings():
    method = tiny_method("xpool")
    index = random_index(method, 7)
    searcher = Searcher(method, index)
    text = searcher.encode_queries(QUERIES[:2])
    t = torch.nn.functional.normalize(text["text"].double(), dim=-1)
    v = torch.nn.functional.normalize(index.features["frames"].double().mean(1), dim=-1)
    torch.testing.assert_close(searcher.coarse_scores(text).double(), t @ v.t(), rtol=1e-5, atol=1e-6)


def test_bad_queries_and_missing_index(tmp_path):
    from tvr_platform.search import load_index

    method = tiny_method("meanp")
    searcher = Searcher(method, random_index(method, 3))
    with pytest.raises(ValueError, match="non-empty"):
        searcher.search("  ")
    with pytest.raises(ValueError, match="top_k"):
        searcher.search("a", top_k=0)
    assert len(searcher.search("a red circle", top_k=10)) == 3        # k capped at the index size
    with pytest.raises(FileNotFoundError, match="tvr index build"):
        load_index(str(tmp_path / "nowhere"))


def test_default_index_sits_next_to_the_videos():
    from tvr_platform.search import default_index_uri

    assert default_index_uri("s3://b/data/msrvtt/videos", "models:/tvr@champion") == \
        "s3://b/data/msrvtt/tvr-index/tvr@champion"
    assert default_index_uri("/d/videos/", "models:/m/3") == "/d/tvr-index/m_3"


# -- round trip on a trained model (Ray) ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_index_round_trip_finds_the_captioned_clip(tmp_path, capsys):
    """Train a tiny meanP until it fits its training captions (240 steps), build the index of all
    48 clips in two resumed runs, search every caption: the hits equal the model's own scores on
    directly decoded clips, and the clip whose caption is queried comes back first for a good share
    of the training captions (several times chance, 1 in 48). The same model then goes through `tvr eval` (one
    training serves both: training dominates the cost). Search with per-frame (X-Pool, T-MASS) and
    fine-grained (UCoFIA) features is covered by the exhaustive/two-stage tests above."""
    import numpy as np

    from tiny import tiny_overrides
    from tvr.data.frames import decode_frames, normalize
    from tvr_platform.cli import main
    from tvr_platform.config import load_job
    from tvr_platform.data.pipeline import backbone_preprocess, dataset_storage, load_manifest, videos_uri
    from tvr_platform.recipes import ensure_synthetic, train
    from tvr_platform.report.plots import PLOTS
    from tvr_platform.search import build_index, load_index
    from tvr_platform.search.cli import open_searcher

    overrides = tiny_overrides(tmp_path, **{
        "model.method": "meanp", "train.epochs": 40, "train.eval_every": 40, "train.num_workers": 0,
        "data.synth.num_clips": 48, "data.batch_size": 6, "train.lr": 5e-4, "train.backbone_lr": 5e-4,
        "train.weight_decay": 0.05, "train.warmup_steps": 10, "tracking.registered_model": "tiny-search"})
    job = load_job(None, overrides)
    ensure_synthetic(job)
    train(job, register=True)
    model = "models:/tiny-search@champion"
    videos = videos_uri(job)
    wd = [f"run.work_dir={tmp_path}", "data.decode_num_cpus=0.5", "data.decode_concurrency=1"]

    first = build_index(model, videos, overrides=wd, batch_size=4, max_clips=5)   # interrupted build
    assert first["embedded"] == 5 and first["already_indexed"] == 0
    assert main(["index", "build", model, *wd, "--videos", videos, "--batch-size", "4"]) == 0
    assert "5 already indexed, 43 embedded now" in capsys.readouterr().out
    index = load_index(first["index"])
    assert len(index) == 48 == len(set(index.ids)) and index.meta["model_version"] == "models:/tiny-search/1"
    assert index.features["video"].shape[0] == 48
    again = build_index(model, videos, overrides=wd, batch_size=4)
    assert again["embedded"] == 0 and again["already_indexed"] == 48

    # independent scores: decode each clip without Ray, encode, score with the method
    searcher = open_searcher(None, wd)
    method = searcher.method
    size, mean, std = backbone_preprocess(job.model.backbone.name)
    store = dataset_storage(job).child(job.data.videos)
    clips = torch.from_numpy(np.stack([
        normalize(decode_frames(store.read_bytes(v), job.data.num_frames, size=size, mode="uniform").frames,
                  mean, std) for v in index.ids]))
    train_m, test_m = load_manifest(job, "train"), load_manifest(job, "test")
    captions = train_m.captions + test_m.captions
    files = [m.video_files[v] for m in (train_m, test_m) for v in m.caption_video]
    n_train = len(train_m.captions)
    with torch.no_grad():
        full = method.similarity(method.encode_text(method.backbone.tokenize(captions)), method.encode_video(clips))
    found = 0
    for c, (caption, file) in enumerate(zip(captions, files)):
        hits = searcher.search(caption, top_k=3)
        expect = torch.sort(-full[c], stable=True).indices[:3]
        assert [h.video_id for h in hits] == [index.ids[i] for i in expect]
        np.testing.assert_allclose([h.score for h in hits], full[c, expect].numpy(), rtol=1e-4, atol=1e-5)
        if index.ids[int(expect[0])] == file:
            assert hits[0].video_id == file
            found += c < n_train
    # chance is n_train / 48 (about 2); a tiny meanP after 240 steps finds several times that
    assert found >= n_train // 6, f"the trained model finds only {found}/{n_train} training captions' clips"

    assert main(["search", captions[0], *wd, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "48 clips, meanp (exhaustive)" in out and out.count(".mp4") == 2
    first_caption = dict(zip(reversed(files), reversed(captions)))  # each clip's first caption
    assert main(["search", captions[0], *wd, "--top-k", "2", "--json"]) == 0
    found_json = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [h["rank"] for h in found_json["hits"]] == [1, 2] and found_json["mode"] == "exhaustive"
    for h in found_json["hits"]:
        assert h["caption"] == first_caption[h["video_id"]] and h["caption"] in out

    # the same registered model through `tvr eval`: JSON report + plots, logged to MLflow
    from mlflow.tracking import MlflowClient

    assert main(["eval", model, *wd, "--dsl", "--split", "test"]) == 0
    report_line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[tvr] report:")][0]
    report = json.loads(open(report_line.split()[2]).read())
    assert report["meta"]["dsl"] is True and report["meta"]["split"] == "test"
    assert set(report["metrics"]) >= {"t2v_R1", "v2t_MnR"} and len(report["similarity_sample"]["matrix"]) == 12
    assert len(report["modality_gap"]["pca"]["text"]) == len(test_m.captions)
    client = MlflowClient(job.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(job.tracking.experiment).experiment_id],
                             filter_string="tags.`tvr.run_name` LIKE 'eval-%'")[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "report/plots")}
    assert logged == {f"report/plots/{p}" for p in PLOTS}
    assert run.data.metrics["test/t2v_R1"] == pytest.approx(report["metrics"]["t2v_R1"])
    assert run.info.run_name == "eval-tiny-search-v1-test" and run.data.tags["tvr.model_version"] == "1"
    assert client.get_model_version("tiny-search", "1").tags["eval_run.test"] == run.info.run_id
    # a second eval: a new report folder and run, the first one kept
    assert main(["eval", model, *wd, "--split", "test"]) == 0
    second = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[tvr] report:")][0].split()[2]
    assert second != report_line.split()[2] and Path(report_line.split()[2]).exists()


def test_top_k_equals_the_stable_full_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    for n, k in ((50, 7), (50, 50), (9, 3), (1, 1)):
        s = torch.randint(0, 4, (n,), generator=g).float()                  # many ties
        from tvr_platform.search.first_stage import topk_stable

        vals, rows = topk_stable(s, k)
        ref = torch.sort(-s, stable=True).indices[:k]
        assert torch.equal(rows, ref) and torch.equal(vals, s[ref])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_first_stage_against_exact_cosines(kind):
    from tvr_platform.search.first_stage import FirstStage

    g = torch.Generator().manual_seed(2)
    x, q = torch.randn(3000, 16, generator=g) * 3, torch.randn(6, 16, generator=g)
    exact = FirstStage(x, kind="torch")
    s_ref, r_ref = exact.search(q, 10)
    ref = torch.nn.functional.normalize(q.double(), dim=-1) @ torch.nn.functional.normalize(x.double(), dim=-1).t()
    assert torch.equal(r_ref, torch.sort(-ref, dim=1, stable=True).indices[:, :10])
    stage = FirstStage(x, kind=kind, nprobe=10_000 if kind == "ivf" else 32)   # IVF visiting every list: exact
    s, r = stage.search(q, 10)
    assert s.shape == r.shape == (6, 10) and stage.kind == kind
    if kind == "hnsw":
        assert topk_overlap(r_ref, r) >= 0.9
    else:
        assert torch.equal(r, r_ref)
    torch.testing.assert_close(s.double(), ref.gather(1, r), rtol=0, atol=1e-6)
    ivf = FirstStage(x, kind="auto", ivf_from=1000, nprobe=1)                # auto: IVF above the threshold
    assert ivf.kind == "ivf" and (ivf.search(q, 3000)[1] >= 0).all()        # short lists widened, no -1 rows
    with pytest.raises(ValueError, match="kind must be one of"):
        FirstStage(x, kind="annoy")


def test_meanp_from_the_first_stage_equals_exhaustive():
    method = tiny_method("meanp")
    index = random_index(method, 40)
    text = Searcher(method, index).encode_queries(QUERIES)
    s_ex, r_ex = Searcher(method, index).search_features(text, top_k=5)
    s_fs, r_fs = Searcher(method, index, global_first_stage=True).search_features(text, top_k=5)
    assert torch.equal(r_ex, r_fs)
    torch.testing.assert_close(s_ex, s_fs, rtol=0, atol=1e-6)
