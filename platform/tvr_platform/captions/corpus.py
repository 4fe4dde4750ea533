"""Corpus captioning (``tvr captions generate``): K captions for every video, as a Ray Data job.

Storage layout, next to the dataset (local directory or S3, via :mod:`tvr_platform.storage`):

    <dataset_uri>/captions/<captions.output_name>/
        parts/<uuid>.parquet      one file per captioned batch, written atomically
        csi/best_prompt.txt       the best prompt of the last ``captions improve`` run
        csi/result.json           its pool, history, stop reason and MLflow run id

Part schema (one row per video): ``video_id`` string, ``captions`` list<string> (≤ K, each ≤
``max_caption_tokens`` CLIP tokens), ``prompt`` string, ``backend`` string, ``model`` string
(the chat model, or ``retrieval:<backbone>``), ``split`` string, ``created_at`` string (UTC ISO 8601).
When a video appears in several parts, the row with the latest ``created_at`` wins.

Resumability: the videos already present in any part are skipped before decoding; videos that
failed (malformed replies after all retries) or were left over when the token/cost budget ran out
are simply not written, so the next run picks them up. A part is written only when its batch is
done, so an interrupted job loses at most the batches in flight.

Concurrency: ``captions.concurrency`` caption actors (Ray Data actor pool), each with one batch and
up to ``captions.requests_in_flight`` requests in flight (threads), each rate-limited to
``captions.requests_per_minute``; the budget is a Ray actor shared by all of them
(:class:`BudgetLedger`). The driver logs videos done / total, tokens, cost and an ETA every
``captions.progress_every_s`` seconds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from tvr_platform.config import JobCfg, job_from_dict, job_to_dict, join_uri

log = logging.getLogger(__name__)

PARTS = "parts"
CSI_DIR = "csi"
COLUMNS = ("video_id", "captions", "prompt", "backend", "model", "split", "created_at")


def captions_uri(job: JobCfg, name: str | None = None) -> str:
    """``<dataset>/captions/<name>`` (default ``captions.output_name``)."""
    return join_uri(job.dataset_uri, "captions", name or job.captions.output_name)


def captions_storage(job: JobCfg, name: str | None = None):
    from tvr_platform.storage import storage_for

    return storage_for(job, captions_uri(job, name))


def _schema():
    import pyarrow as pa

    return pa.schema([("video_id", pa.string()), ("captions", pa.list_(pa.string())), ("prompt", pa.string()),
                      ("backend", pa.string()), ("model", pa.string()), ("split", pa.string()),
                      ("created_at", pa.string())])


def write_part(store: Any, rows: Sequence[dict[str, Any]]) -> str | None:
    """Write one Parquet part of caption rows (atomically); returns its URI (None if no rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return None
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return store.write_bytes(f"{PARTS}/{uuid.uuid4().hex}.parquet", buf.getvalue())


def read_parts(store: Any):
    """Every readable part as one table (unreadable parts are skipped with a warning)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for rel in store.list(PARTS):
        if not rel.endswith(".parquet"):
            continue
        try:
            t = pq.read_table(io.BytesIO(store.read_bytes(rel)))
            tables.append(t.select(list(COLUMNS)).cast(_schema()))
        except Exception as err:  # noqa: BLE001 - a damaged part must not block the rest
            log.warning("skipping unreadable captions part %s (%s)", store.url(rel), type(err).__name__)
    return pa.concat_tables(tables) if tables else _schema().empty_table()


def _latest(table) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        cur = best.get(row["video_id"])
        if cur is None or row["created_at"] >= cur["created_at"]:
            best[row["video_id"]] = row
    return best


def load_generated_captions(job: JobCfg, video_ids: Sequence[str], name: str | None = None) -> list[list[str]]:
    """The generated captions of ``video_ids`` (in order) from caption set ``name`` (default
    ``captions.output_name``); [] for a video not captioned (yet)."""
    rows = _latest(read_parts(captions_storage(job, name)))
    out = [list(rows[v]["captions"]) if v in rows else [] for v in video_ids]
    missing = sum(1 for c in out if not c)
    if missing:
        log.warning("%d of %d videos have no generated captions under %s (run 'tvr captions generate')",
                    missing, len(out), captions_uri(job, name))
    return out


def aux_caption_tokens(job: JobCfg, manifest: Any) -> np.ndarray:
    """Token ids (N_videos, K, L) int64 of the caption set ``data.aux_captions`` for ``manifest``:
    the ``aux_texts`` column of the training / evaluation rows (ExCae's K auxiliary captions).

    K = ``captions.captions_per_video`` (extra captions dropped); a video with fewer captions, or
    none yet, gets all-zero rows (padding: ExCae masks them out). A split with no captions at all
    is a configuration error, not something to train on silently."""
    from tvr.backbone import get_tokenizer

    name = job.data.aux_captions
    caps = load_generated_captions(job, manifest.video_ids, name)
    if manifest.num_videos and not any(caps):
        raise ValueError(f"data.aux_captions={name!r}: no generated captions for any video of split "
                         f"{manifest.split!r} under {captions_uri(job, name)}; run 'tvr captions generate "
                         f"<spec> captions.output_name={name}' first (or set data.aux_captions='')")
    tok = get_tokenizer(job.model.backbone.name)
    K = job.captions.captions_per_video
    out = np.zeros((manifest.num_videos, K, tok.context_length), np.int64)    # (N, K, L)
    for i, c in enumerate(caps):
        if c:
            ids = tok(c[:K]).numpy().astype(np.int64)                          # (k_i, L)
            out[i, :len(ids)] = ids
    return out


def done_video_ids(job: JobCfg) -> set[str]:
    """Videos that already have captions (skipped by the next run)."""
    return {v for v in read_parts(captions_storage(job)).column("video_id").to_pylist() if v}


# -- CSI result ---------------------------------------------------------------------------------

def save_csi_result(job: JobCfg, best_prompt: str, result: dict[str, Any]) -> str:
    store = captions_storage(job)
    store.write_bytes(f"{CSI_DIR}/result.json", json.dumps(result, indent=2).encode("utf-8"))
    return store.write_bytes(f"{CSI_DIR}/best_prompt.txt", best_prompt.encode("utf-8"))


def load_best_prompt(job: JobCfg) -> str | None:
    store = captions_storage(job)
    if not store.exists(f"{CSI_DIR}/best_prompt.txt"):
        return None
    return store.read_text(f"{CSI_DIR}/best_prompt.txt").strip() or None


def resolve_prompt(job: JobCfg, prompt: str | None = None) -> str:
    """Explicit prompt > captions.prompt > the saved CSI best prompt > the paper's initial prompt."""
    from tvr.captioning import initial_prompt

    chosen = prompt or job.captions.prompt or load_best_prompt(job)
    if not chosen:
        log.warning("no CSI best prompt under %s; using the initial prompt (run 'tvr captions improve')",
                    captions_uri(job))
    return chosen or initial_prompt(job.captions.captions_per_video, job.captions.initial_prompt)


# -- data -----------------------------------------------------------------------------------------

def subset_manifest(manifest: Any, keep: Sequence[int]) -> Any:
    """The manifest restricted to videos ``keep`` (indices), captions re-indexed."""
    keep = list(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    caps = [(c, new_index[v]) for c, v in zip(manifest.captions, manifest.caption_video) if v in new_index]
    return dataclasses.replace(
        manifest, video_ids=[manifest.video_ids[i] for i in keep],
        video_files=[manifest.video_files[i] for i in keep],
        captions=[c for c, _ in caps], caption_video=[v for _, v in caps],
        segments=[manifest.segments[i] for i in keep] if manifest.segments is not None else None,
        quarantine=[])


def without_aux_captions(job: JobCfg) -> JobCfg:
    """``job`` with ``data.aux_captions=''``: captioning reads frames only (the captions it writes may
    be the very set that ``data.aux_captions`` names, so they cannot be an input)."""
    return dataclasses.replace(job, data=dataclasses.replace(job.data, aux_captions=""))


def caption_bank(job: JobCfg) -> tuple[list[str], list[str]]:
    """(texts, video ids) of the training split: the retrieval captioner's caption bank."""
    from tvr_platform.data.pipeline import load_manifest

    m = load_manifest(job, job.data.train_split)
    return list(m.captions), [m.video_ids[v] for v in m.caption_video]


# -- the budget actor and the caption workers -------------------------------------------------------

class BudgetLedger:
    """Shared token/cost budget and usage counters (run as a Ray actor)."""

    def __init__(self, **cfg: Any):
        from tvr_platform.captions.openai_backend import BudgetState

        self.state = BudgetState(**cfg)

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.state.spend(prompt_tokens, completion_tokens)

    def exhausted(self) -> bool:
        return self.state.exhausted()

    def snapshot(self) -> dict[str, float]:
        return self.state.to_dict()


class RayBudget:
    """:class:`~tvr_platform.captions.openai_backend.Budget` backed by a BudgetLedger actor."""

    def __init__(self, ledger: Any):
        self.ledger = ledger

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        import ray

        ray.get(self.ledger.spend.remote(prompt_tokens, completion_tokens))

    def exhausted(self) -> bool:
        import ray

        return bool(ray.get(self.ledger.exhausted.remote()))


def build_captioner(job: JobCfg, *, backbone: Any = None, bank: tuple[Sequence[str], Sequence[str]] | None = None,
                    budget: Any = None, sleep: Any = time.sleep, api_key: Any = None, cache: Any = None,
                    progress: Any = None, rate_limiter: Any = None) -> tuple[Any, str]:
    """The configured captioner and the model name recorded with its captions.

    ``api_key``: a :class:`~tvr_platform.captions.openai_backend.Secret` (None = read the env);
    ``cache`` / ``progress`` / ``rate_limiter``: the OpenAI backend's reply cache, progress line and
    rate limiter (a limiter from ``captions.requests_per_minute`` by default)."""
    cfg = job.captions
    if cfg.backend == "openai":
        from tvr_platform.captions.openai_backend import ChatClient, OpenAICaptioner, RateLimiter
        from tvr_platform.data.pipeline import backbone_preprocess

        _, mean, std = backbone_preprocess(job.model.backbone.name, job.model.backbone.pretrained,
                                job.model.backbone.image_size)
        limiter = rate_limiter if rate_limiter is not None else RateLimiter(cfg.requests_per_minute)
        client = ChatClient.from_cfg(cfg, budget=budget, sleep=sleep, api_key=api_key, rate_limiter=limiter,
                                     cache=cache)
        return OpenAICaptioner(client, mean=mean, std=std, frames_per_request=cfg.frames_per_request,
                               jpeg_quality=cfg.jpeg_quality, max_tokens=cfg.max_caption_tokens,
                               concurrency=cfg.requests_in_flight, progress=progress), cfg.api_model
    from tvr.backbone import ClipBackbone
    from tvr.captioning import RetrievalCaptioner

    if backbone is None:
        backbone = ClipBackbone(job.model.backbone).eval()
    texts, ids = bank if bank is not None else caption_bank(job)
    return (RetrievalCaptioner(backbone, texts, ids, max_tokens=cfg.max_caption_tokens),
            f"retrieval:{job.model.backbone.name}")


class CaptionWorker:
    """Ray Data actor: a batch of (video_index, frames) -> captions written as one part -> stats row."""

    def __init__(self, *, job: dict[str, Any], prompt: str, video_ids: list[str], splits: list[str],
                 bank: tuple[list[str], list[str]] | None, ledger: Any, api_key: Any = None):
        import torch

        from tvr_platform.data.pipeline import frame_norm

        torch.set_num_threads(1)
        self.job = job_from_dict(job)
        self.prompt, self.video_ids, self.splits = prompt, video_ids, splits
        self.captioner, self.model = build_captioner(self.job, bank=bank, api_key=api_key,
                                                     budget=RayBudget(ledger) if ledger is not None else None)
        self.store = captions_storage(self.job)
        self.norm = frame_norm(self.job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tvr_platform.data.pipeline import model_frames

        cfg = self.job.captions
        idx = [int(i) for i in batch["video_index"]]
        ids = [self.video_ids[i] for i in idx]
        client = getattr(self.captioner, "client", None)
        before = client.usage.to_dict() if client is not None else {}
        frames = model_frames({"frames": np.stack(list(batch["frames"])), "valid": batch.get("valid")},
                              self.norm).float()                                          # (b, T, 3, H, W)
        caps = self.captioner.caption(frames, self.prompt, cfg.captions_per_video, video_ids=ids)
        now = datetime.now(UTC).isoformat()
        rows = [{"video_id": v, "captions": c, "prompt": self.prompt, "backend": cfg.backend, "model": self.model,
                 "split": self.splits[i], "created_at": now} for v, c, i in zip(ids, caps, idx) if c]
        write_part(self.store, rows)
        after = client.usage.to_dict() if client is not None else {}
        stats = {k: after[k] - before.get(k, 0) for k in after}
        out = {"videos": len(ids), "captioned": len(rows), "skipped": len(ids) - len(rows),
               "exhausted": int(bool(getattr(self.captioner, "exhausted", False))),
               **{f"api_{k}": v for k, v in stats.items()}}
        return {k: np.array([v]) for k, v in out.items()}


# -- the job ---------------------------------------------------------------------------------------

class _KeepIndices:
    """Batch filter: rows whose ``video_index`` is in ``keep``."""

    def __init__(self, keep: set[int]):
        self.keep = np.array(sorted(keep), dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = np.isin(np.asarray(batch["video_index"]).astype(np.int64), self.keep)
        return {k: v[mask] for k, v in batch.items()}


def _ensure_ray(job: JobCfg) -> None:
    import ray

    if not ray.is_initialized():
        from tvr_platform.train.trainer import init_ray

        init_ray(job)


def generate_corpus_captions(job: JobCfg, *, prompt: str | None = None, dataset: Any = None,
                             video_ids: Sequence[str] | None = None, splits: Sequence[str] | None = None,
                             bank: tuple[Sequence[str], Sequence[str]] | None = None) -> dict[str, Any]:
    """Caption every not-yet-captioned video of the corpus with the best prompt (module docstring).

    By default the videos are the splits ``captions.splits`` (or train + test) read through the data
    pipeline; ``dataset`` (a Ray Dataset with ``video_index`` + ``frames`` rows) with ``video_ids``
    (index -> id) replaces them, e.g. for tests or custom corpora."""
    import ray

    cfg = job.captions
    prompt = resolve_prompt(job, prompt)
    done = done_video_ids(job)
    jobs: list[tuple[Any, list[str], list[str]]] = []   # (dataset or manifest, ids by index, split by index)
    todo_counts: list[int] = []                          # videos to caption per entry of jobs
    skipped_done = 0
    if dataset is not None:
        if video_ids is None:
            raise ValueError("generate_corpus_captions: a dataset needs video_ids (video_index -> video id)")
        ids = [str(v) for v in video_ids]
        todo = {i for i, v in enumerate(ids) if v not in done}
        skipped_done = len(ids) - len(todo)
        if todo:
            ds = dataset.map_batches(_KeepIndices(todo), batch_format="numpy") if skipped_done else dataset
            jobs.append((ds, ids, ["custom"] * len(ids)))
            todo_counts.append(len(todo))
    else:
        from tvr_platform.data.pipeline import load_manifest

        for split in (list(splits or cfg.splits) or [job.data.train_split, *filter(None, [job.data.val_split]),
                                                     job.data.test_split]):
            m = load_manifest(job, split)
            keep = [i for i, v in enumerate(m.video_ids) if v not in done]   # skipped before decoding
            skipped_done += m.num_videos - len(keep)
            if keep:
                sub = subset_manifest(m, keep)
                jobs.append((sub, list(sub.video_ids), [split] * len(keep)))
                todo_counts.append(len(keep))
    report: dict[str, Any] = {"prompt": prompt, "backend": cfg.backend, "path": captions_uri(job),
                              "skipped_done": skipped_done, "videos": 0, "captioned": 0, "skipped": 0,
                              "budget_exhausted": False}
    if not jobs:
        log.info("all videos already have captions under %s", captions_uri(job))
        return report
    api_key = None
    if cfg.backend == "openai":
        from tvr_platform.captions.openai_backend import read_api_key

        api_key = read_api_key(cfg.api_key_env, cfg.api_base_url)     # fail fast, on the driver
    _ensure_ray(job)
    if cfg.backend == "retrieval" and bank is None:
        bank = caption_bank(job)
    ledger = None
    if cfg.backend == "openai":
        ledger = ray.remote(num_cpus=0)(BudgetLedger).remote(
            token_budget=cfg.token_budget, cost_budget=cfg.cost_budget,
            price_input_per_mtok=cfg.price_input_per_mtok, price_output_per_mtok=cfg.price_output_per_mtok)
    totals: dict[str, float] = {}
    from tvr_platform.captions.openai_backend import Progress

    spend = (lambda: ray.get(ledger.snapshot.remote())) if ledger is not None else None
    progress = Progress(sum(todo_counts), label="captions generate", budget=spend,
                        every_s=cfg.progress_every_s)
    try:
        for src, ids, split_of in jobs:
            if dataset is None:
                from tvr_platform.data.pipeline import video_dataset

                src = video_dataset(without_aux_captions(job), src, decode_batch_size=cfg.batch_size)
            if dataset is None:                                    # the decoding path's columns
                src = src.select_columns(["video_index", "frames", "valid"])
            ds = src.map_batches(
                CaptionWorker, batch_size=cfg.batch_size, concurrency=cfg.concurrency, batch_format="numpy",
                fn_constructor_kwargs={"job": job_to_dict(job), "prompt": prompt, "video_ids": ids,
                                       "splits": split_of,
                                       "bank": (list(bank[0]), list(bank[1])) if bank is not None else None,
                                       "ledger": ledger, "api_key": api_key})
            for row in ds.iter_rows():
                for k, v in row.items():
                    totals[k] = totals.get(k, 0) + float(v)
                progress.advance(int(row["videos"]))
        if ledger is not None:
            report["budget"] = ray.get(ledger.snapshot.remote())
    finally:
        if ledger is not None:
            ray.kill(ledger)
    report.update({k: int(v) for k, v in totals.items() if k != "exhausted"})
    report["budget_exhausted"] = bool(totals.get("exhausted", 0))
    log.info("captions generate: %s", report)
    return report
