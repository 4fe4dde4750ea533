"""``tvr captions improve``: run ExCae CSI (:func:`tvr.captioning.self_improve`) for a job, log every
round to MLflow and save the best prompt next to the dataset.

MLflow (explicit ``MlflowClient`` on ``job.tracking_uri``, experiment ``tracking.experiment``, one
run named ``<run.name>-csi`` tagged ``tvr.job=captions-improve``):

- params: every ``captions.*`` key (long strings cut to 500 characters; the API key is never in
  the config, only the name of its environment variable) + backbone, method, split, seed;
- metrics per round r (step = r): ``csi_score``, ``csi_similarity``, ``csi_diversity``,
  ``csi_accepted``, ``csi_best_score``, ``csi_pool_size``, ``csi_stale``, ``csi_num_captions``,
  ``csi_num_empty``; at the end ``csi_rounds`` and, for API backends, ``api_*`` usage counters;
- artifacts: ``csi/rounds/round_XXX.txt`` (the prompt of every round), ``csi/pool.json``,
  ``csi/result.json`` (pool + full history + stop reason), ``csi/best_prompt.txt``;
- per round as well, for API backends: ``csi_tokens`` / ``csi_cost`` (spend so far).

Budget and resume: captioner and engineer share one budget (``captions.token_budget`` /
``captions.cost_budget``); when it is spent the loop stops (reason ``budget``) and the best prompt
so far is saved. Every validated reply is kept in ``<dataset>/captions/<output_name>/csi/replies/``
(a :class:`~tvr_platform.captions.openai_backend.ReplyCache`), so a rerun after an interruption or
a spent budget replays the rounds already paid for without a request and continues from there.
Stand-ins: the offline ``retrieval`` captioner and ``rules`` engineer (the defaults) run the loop
without a network but are not the paper's CSI; a warning says so.

The same ``best_prompt.txt`` / ``result.json`` go to ``<dataset>/captions/<output_name>/csi/`` where
``captions generate`` finds them.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from tvr_platform.config import JobCfg

log = logging.getLogger(__name__)


def load_csi_samples(job: JobCfg) -> list[Any]:
    """``captions.sample_size`` training videos (seeded choice) with frames and original texts."""
    from tvr.captioning import VideoSample
    from tvr_platform.captions.corpus import _ensure_ray, subset_manifest, without_aux_captions
    from tvr_platform.data.pipeline import frame_norm, load_manifest, model_frames, video_dataset

    m = load_manifest(job, job.data.train_split)
    if m.num_videos == 0:
        raise ValueError(f"{job.dataset_uri}: split {job.data.train_split!r} has no videos for CSI")
    keep = sorted(random.Random(job.captions.seed).sample(range(m.num_videos),
                                                          min(job.captions.sample_size, m.num_videos)))
    sub = subset_manifest(m, keep)
    per = sub.captions_per_video()
    _ensure_ray(job)
    rows = video_dataset(without_aux_captions(job), sub).take_all()
    rows.sort(key=lambda r: int(r["video_index"]))
    norm = frame_norm(job)
    return [VideoSample(sub.video_ids[int(r["video_index"])],
                        model_frames({"frames": np.asarray(r["frames"]), "valid": np.asarray(r["valid"])}, norm),
                        [sub.captions[j] for j in per[int(r["video_index"])]]) for r in rows]


def build_engineer(job: JobCfg, *, sleep: Any = None, budget: Any = None, cache: Any = None,
                   rate_limiter: Any = None) -> Any:
    from tvr.captioning import RuleBasedPromptEngineer

    cfg = job.captions
    if cfg.engineer == "openai":
        from tvr_platform.captions.openai_backend import ChatClient, OpenAIPromptEngineer, budget_from_cfg

        kw = {"sleep": sleep} if sleep is not None else {}
        return OpenAIPromptEngineer(ChatClient.from_cfg(
            cfg, model=cfg.engineer_model or cfg.api_model,
            budget=budget if budget is not None else budget_from_cfg(cfg), cache=cache,
            rate_limiter=rate_limiter, **kw))
    return RuleBasedPromptEngineer(diversity_weight=cfg.diversity_weight)


def _params(job: JobCfg) -> dict[str, str]:
    out = {f"captions.{f.name}": getattr(job.captions, f.name) for f in fields(job.captions)}
    out.update({"model.backbone.name": job.model.backbone.name, "model.method": job.model.method,
                "data.train_split": job.data.train_split, "data.root": job.dataset_uri})
    return {k: str(v)[:500] for k, v in out.items()}


class _MlflowRun:
    """The few MLflow calls CSI makes, on an explicit client (no global MLflow state)."""

    def __init__(self, job: JobCfg):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(job.tracking_uri)
        exp = self.client.get_experiment_by_name(job.tracking.experiment)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(job.tracking.experiment,
                                                       artifact_location=job.artifact_location)
            except Exception:  # noqa: BLE001 - created concurrently
                exp_id = self.client.get_experiment_by_name(job.tracking.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        self.run_id = self.client.create_run(exp_id, run_name=f"{job.run.name}-csi",
                                             tags={"tvr.job": "captions-improve"}).info.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i:i + 90])


def run_csi(job: JobCfg, *, samples: list[Any] | None = None, backbone: Any = None,
            bank: tuple[list[str], list[str]] | None = None, captioner: Any = None, engineer: Any = None,
            extractor: Any = None, track: bool = True, sleep: Any = None) -> dict[str, Any]:
    """Run CSI for ``job``; returns {"best_prompt", "best_score", "rounds", "stop_reason", "run_id", ...}.

    Every collaborator can be injected (tests, notebooks); by default they come from the config:
    the retrieval captioner on ``model.backbone`` with the training captions as bank, or the
    OpenAI-compatible captioner; the rule-based or LLM prompt engineer; ψ from ``captions.extractor``.
    Captioner and engineer built here share one budget, one rate limiter and one reply cache."""
    import time

    import torch

    from tvr.backbone import ClipBackbone
    from tvr.captioning import make_extractor, self_improve
    from tvr_platform.captions.corpus import CSI_DIR, build_captioner, captions_storage, save_csi_result
    from tvr_platform.captions.openai_backend import Progress, RateLimiter, ReplyCache, budget_from_cfg

    cfg = job.captions
    stand_ins = [f"captions.{k}={v}" for k, v in (("backend", cfg.backend), ("engineer", cfg.engineer))
                 if v in ("retrieval", "rules")]
    if stand_ins and captioner is None and engineer is None:
        log.warning("CSI with offline stand-ins (%s): they run the loop without a network but are not "
                    "the paper's captioner / LLM prompt engineer; see docs/excae.md", ", ".join(stand_ins))
    torch.manual_seed(job.run.seed)
    if samples is None:
        samples = load_csi_samples(job)
    uses_api = "openai" in (cfg.backend, cfg.engineer)
    budget = budget_from_cfg(cfg)
    limiter = RateLimiter(cfg.requests_per_minute)
    cache = ReplyCache(captions_storage(job).child(f"{CSI_DIR}")) if uses_api else None
    progress = Progress(len(samples), label="CSI captions", budget=budget, every_s=cfg.progress_every_s)
    kw = {"sleep": sleep} if sleep is not None else {}
    if backbone is None and (captioner is None or (extractor is None and cfg.extractor == "clip")):
        backbone = ClipBackbone(job.model.backbone).eval()
    if captioner is None:
        captioner, _ = build_captioner(job, backbone=backbone, bank=bank, budget=budget, cache=cache,
                                       progress=progress, rate_limiter=limiter, **kw)
    engineer = engineer if engineer is not None else build_engineer(job, budget=budget, cache=cache,
                                                                    rate_limiter=limiter, **kw)
    extractor = extractor if extractor is not None else make_extractor(cfg.extractor, backbone)

    run = _MlflowRun(job) if track else None
    if run is not None:
        run.params(_params(job))
    started = time.monotonic()

    def on_round(rep: Any) -> None:
        c = rep.candidate
        progress.done = 0                                   # the next round captions the sample again
        elapsed = time.monotonic() - started
        eta = elapsed / rep.round * (cfg.max_rounds - rep.round) if rep.round else None
        spend = budget.to_dict()
        log.info("CSI round %d/%d: score %s %s | best %.4f | %d tokens, cost %.4f | %.0fs, at most %s left | %s",
                 rep.round, cfg.max_rounds, rep.components.get("score", "n/a"),
                 "accepted" if c.accepted else "rejected", rep.best_score,
                 spend["prompt_tokens"] + spend["completion_tokens"], spend["cost"], elapsed,
                 "?" if eta is None else f"{eta:.0f}s", c.prompt[:200])
        if run is None:
            return
        values = {f"csi_{k}": v for k, v in rep.components.items()}
        values.update(csi_best_score=rep.best_score, csi_pool_size=rep.pool_size, csi_stale=rep.stale)
        if uses_api:
            values.update(csi_tokens=spend["prompt_tokens"] + spend["completion_tokens"], csi_cost=spend["cost"])
        run.metrics(values, step=rep.round)
        run.client.log_text(run.run_id, c.prompt or "(no new prompt)", f"csi/rounds/round_{rep.round:03d}.txt")

    status = "FAILED"
    try:
        result = self_improve(samples, captioner=captioner, engineer=engineer, extractor=extractor,
                              k=cfg.captions_per_video, initial=cfg.initial_prompt, max_rounds=cfg.max_rounds,
                              patience=cfg.patience, pool_size=cfg.pool_size,
                              diversity_weight=cfg.diversity_weight, num_examples=cfg.num_examples,
                              batch_size=cfg.batch_size, candidates_per_round=cfg.candidates_per_round,
                              callback=on_round, budget_spent=budget.exhausted)
        out = result.to_dict()
        out["run_id"] = run.run_id if run is not None else None
        usage = {}
        for name, obj in (("captioner", captioner), ("engineer", engineer)):
            client = getattr(obj, "client", None)
            if client is not None and hasattr(client, "usage"):
                usage[name] = client.usage.to_dict()
        out["usage"] = usage
        out["budget"] = budget.to_dict()
        if run is not None:
            run.metrics({"csi_rounds": result.rounds,
                         **{f"api_{n}_{k}": v for n, u in usage.items() for k, v in u.items()}}, step=result.rounds)
            run.client.log_dict(run.run_id, [asdict(c) for c in result.pool], "csi/pool.json")
            run.client.log_dict(run.run_id, out, "csi/result.json")
            run.client.log_text(run.run_id, result.best.prompt, "csi/best_prompt.txt")
        saved = save_csi_result(job, result.best.prompt, out)
        status = "FINISHED"
    finally:
        if cache is not None:
            cache.flush()
        if run is not None:
            run.client.set_terminated(run.run_id, status=status)
    return {"best_prompt": result.best.prompt, "best_score": result.best.score, "rounds": result.rounds,
            "stop_reason": result.stop_reason, "pool": [c.prompt for c in result.pool],
            "run_id": out["run_id"], "saved": saved, "usage": usage, "budget": out["budget"]}
