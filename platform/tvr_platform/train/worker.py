"""``train_loop_per_worker``: what every Ray Train worker runs, top to bottom.

setup (config, seeds, model from the method table, optimiser, strategy, resume)
-> per epoch: train steps (global-batch contrastive loss), evaluation on the *validation* split,
   checkpoint + report
-> after the last epoch: the best epoch by validation (``train.select_metric``; a later epoch wins
   a tie) is loaded back from its checkpoint and the *test* split is evaluated once, with those
   weights (``final/test/*``); the test split never influences a choice.

Model selection: every report carries ``selection_score`` (the epoch's validation
``train.select_metric``, NaN when it was not evaluated) and ``best_epoch`` (the best so far);
Ray Train keeps the ``train.checkpoints_to_keep`` best checkpoints by that score plus the latest,
and an epoch that is the best so far writes the exported weights (``model.pt``) into its
checkpoint, so the best epoch's checkpoint holds what gets registered.

The loop never branches on the method: everything method-specific is behind the method
interface (encode / similarity / loss / param_groups), reached through ``RetrievalStep``.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvr.backbone import ClipBackbone
from tvr.methods import build_method
from tvr_platform.config import JobCfg, job_from_dict
from tvr_platform.distributed import all_gather_with_grad, gather_objects, world
from tvr_platform.evaluation import concat_features, embed_texts, embed_videos, evaluate, order_by_index
from tvr_platform.train.perf import measure_peak_flops, mfu, train_flops_per_clip
from tvr_platform.train.step import RetrievalStep
from tvr_platform.train.strategy import (
    DDPStrategy,
    DeepSpeedStrategy,
    deepspeed_config,
    load_pretrained_partitioned,
    lr_lambda,
    safe_load,
    zero3_init,
)

EXPORT_FILE = "model.pt"
STATE_FILE = "train_state.json"
SCORE_KEY = "selection_score"
SCORE_KEYS = ("t2v_", "v2t_", "num_videos", "num_texts")   # evaluation results (logged as val/..., test/...)


def improves(score: float | None, best: float | None, mode: str) -> bool:
    """Whether an epoch scoring ``score`` becomes the selected epoch over the best so far: strictly
    better, or equal (the later epoch wins a tie, as Ray Train's checkpoint ranking does). A missing
    or NaN score (no validation that epoch) never does."""
    if score is None or score != score:
        return False
    if best is None:
        return True
    return score >= best if mode == "max" else score <= best


def select_epoch(scores: list[tuple[int, float | None]], mode: str) -> int | None:
    """The epoch :func:`improves` ends on for per-epoch validation ``scores`` [(epoch, score)]."""
    best, chosen = None, None
    for epoch, score in scores:
        if improves(score, best, mode):
            best, chosen = score, epoch
    return chosen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(job: JobCfg, pretrained_path: str | None,
                zero3_config: dict | None = None) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Backbone + method, built identically on every rank (same seed), and the 0-dim parameters
    held as shape [1] (ZeRO-3 only, see :func:`zero3_init`).

    Under ZeRO-3 (``zero3_config``, DeepSpeed's config) the parameters are partitioned at
    construction (``deepspeed.zero.Init``), so no host holds them all: the backbone is built
    without weights, with the activation the weights need, and the checkpoint (an open_clip tag's
    file, a local file or one fetched from s3://) is then streamed into the partitions by
    :func:`load_pretrained_partitioned`, read on rank 0 only."""
    from dataclasses import replace

    backbone_cfg = job.model.backbone
    if pretrained_path is not None:
        backbone_cfg = replace(backbone_cfg, pretrained=pretrained_path)
    if zero3_config is None:
        return build_method(job.model.method, job.method_cfg, ClipBackbone(backbone_cfg)), []
    from tvr.backbone import download_tag, pretrained_tag_cfg, resolve_quick_gelu

    ref = backbone_cfg.pretrained
    rank = world()[0]
    tag = pretrained_tag_cfg(backbone_cfg.name, ref)
    qg = resolve_quick_gelu(backbone_cfg.name, ref, backbone_cfg.quick_gelu) if ref else backbone_cfg.quick_gelu
    with zero3_init(zero3_config) as held:
        method = build_method(job.model.method, job.method_cfg,
                              ClipBackbone(replace(backbone_cfg, pretrained=None, quick_gelu=qg)))
    if ref:
        clip = method.backbone.clip
        load_pretrained_partitioned(clip, (download_tag(tag) if tag else ref) if rank == 0 else None, rank)
        if tag:  # the tag's preprocessing, as tvr.backbone.create_clip sets it
            from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
            from open_clip.model import set_model_preprocess_cfg
            from open_clip.transform import merge_preprocess_dict

            set_model_preprocess_cfg(clip, merge_preprocess_dict(
                {"size": clip.visual.image_size, "mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD}, tag))
    return method, held


def local_pretrained(job: JobCfg, path: str | None, rank: int, zero3: bool) -> str | None:
    """The checkpoint file on this worker's node: the driver fetched an s3:// checkpoint to its
    own work dir, which a worker on another node does not see, so such a worker fetches it again
    (once per node). Under ZeRO-3 only rank 0 reads it."""
    ref = job.model.backbone.pretrained
    if not path or not ref or not ref.startswith("s3://") or Path(path).is_file() or (zero3 and rank != 0):
        return path
    from tvr_platform.train.trainer import resolve_pretrained

    return resolve_pretrained(job)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from tvr_platform.data.pipeline import (
        frame_norm,
        load_splits,
        model_frames,
        pick_captions,
        tokenize_captions,
    )
    from tvr_platform.tracking import Tracker

    # -- setup --------------------------------------------------------------------------------
    job = job_from_dict(config["job"])
    rank, world_size = world()
    device = ray.train.torch.get_device()
    use_bf16 = job.train.precision == "bf16" or (job.train.precision == "auto" and device.type == "cuda")
    seed_everything(job.run.seed)
    tracker = Tracker(**config["tracker"]) if rank == 0 and config.get("tracker") else None

    zero3 = job.train.strategy == "deepspeed" and job.train.zero_stage == 3
    ds_cfg = deepspeed_config(job.train, job.data.batch_size, use_bf16)
    method, held_scalars = build_model(job, local_pretrained(job, config.get("pretrained_path"), rank, zero3),
                                       ds_cfg if zero3 else None)
    gather = all_gather_with_grad if job.train.gather_with_grad else (lambda x: x)
    module = RetrievalStep(method, gather).to(device)

    steps_per_epoch = max(1, config["num_train_videos"] // (job.data.batch_size * world_size))
    if job.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, job.train.max_steps_per_epoch)
    total_updates = max(1, job.train.epochs * steps_per_epoch // job.train.grad_accum)
    optimizer = torch.optim.AdamW(method.param_groups(job.train.lr, job.train.backbone_lr,
                                                      job.train.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job.train.warmup_steps, total_updates))
    if job.train.strategy == "deepspeed":
        strategy = DeepSpeedStrategy(module, optimizer, scheduler, ds_cfg, held_scalars)
    else:
        strategy = DDPStrategy(module, optimizer, scheduler, job.train,
                               torch.bfloat16 if use_bf16 and device.type == "cuda" else None)

    start_epoch, global_step = 0, 0
    best: dict[str, Any] = {"epoch": None, "score": None}   # the selected epoch so far (by validation)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            client_state = strategy.load(Path(d))
            rng_file = Path(d) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                torch.set_rng_state(safe_load(rng_file)["torch"])
            state_file = Path(d) / STATE_FILE
            if tracker and state_file.exists():
                log_committed_epoch(tracker, json.loads(state_file.read_text()))
        start_epoch, global_step = client_state["epoch"] + 1, client_state["global_step"]
        best = dict(client_state.get("best") or best)
    weights_epoch = start_epoch - 1                       # the epoch whose weights the model holds
    local_dirs: dict[int, str] = {}                       # local mode: epoch -> its kept checkpoint dir

    probe = config.get("probe")  # test hook: the exact next step after a checkpoint, see probe_step
    if probe is not None and checkpoint is not None:
        report_probe(tracker, probe_step(strategy, module, device, job), global_step)
        return

    # Rank 0 scores alone, under ZeRO-3 too: eval_module gathers the weights and runs no
    # DeepSpeed hooks, so its forwards are not collectives.
    scorer = rank == 0
    captions: dict[str, Any] = {}                         # split -> (texts, caption_video, num_videos)
    if scorer:
        _, val_manifest, test_manifest = load_splits(job)
        for name, m in (("val", val_manifest), ("test", test_manifest)):
            captions[name] = (*tokenize_captions(job, m), m.num_videos)

    def score_split(name: str) -> dict[str, Any]:
        """Embed this rank's shard of ``name`` (val | test), score on the scorer ranks; every rank
        gets the scores (a collective)."""
        scores: dict[str, Any] = {}
        with strategy.eval_module() as eval_module:
            feats, index = embed_videos(eval_module, ray.train.get_dataset_shard(name).iter_torch_batches(
                batch_size=job.data.eval_batch_size), device, norm)
            parts = gather_objects((feats, index))
            if scorer:
                texts, caption_video, n_videos = captions[name]
                video = order_by_index(concat_features([p[0] for p in parts]),
                                       torch.cat([p[1] for p in parts]), n_videos)
                text = embed_texts(eval_module, texts, job.data.eval_batch_size, device)
                scores, _ = evaluate(eval_module, text, video, caption_video, block=job.eval.block_size,
                                     dsl=job.eval.dsl, sinkhorn_iters=job.eval.sinkhorn_iters, device=device,
                                     v2t_rank=job.eval.v2t_rank, dsl_v2t=job.eval.dsl_v2t)
                scores = {**scores, "num_videos": int(sum(len(p[1]) for p in parts)), "num_texts": len(texts)}
        return gather_objects(scores)[0]
    n_frames = job.data.num_frames
    norm = frame_norm(job)                                  # uint8 frames are normalised on `device`
    flops_per_clip, peak_flops = train_flops_per_clip(method.backbone.clip, n_frames), 0.0
    if tracker and device.type == "cuda":
        peak_flops = job.train.peak_tflops * 1e12 or measure_peak_flops(device)
        tracker.log_metrics({"perf/peak_tflops": peak_flops / 1e12, "perf/model_tflops_per_clip":
                             flops_per_clip / 1e12}, step=0)
    fail_at = config.get("fail_at_step")  # test hook: raise once in rank 1 to exercise FailureConfig

    # -- epochs -------------------------------------------------------------------------------
    t_run = time.perf_counter()
    for epoch in range(start_epoch, job.train.epochs):
        t_epoch = time.perf_counter()
        strategy.train(True)
        shard = ray.train.get_dataset_shard("train")
        losses: list[float] = []
        t_wait = time.perf_counter()
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=job.data.batch_size, drop_last=True)):
            if i >= steps_per_epoch:
                break
            t_start = time.perf_counter()
            text = pick_captions(batch["texts"], batch["num_texts"], batch["video_index"], epoch, job.run.seed)
            aux = batch.get("aux_texts")
            out = strategy(mode="loss", frames=model_frames(batch, norm, device), text=text.to(device),
                           captions=None if aux is None else aux.to(device))
            if fail_at is not None and rank == 1 and global_step == fail_at and checkpoint is None:
                raise RuntimeError(f"injected failure at step {global_step} (train_loop_config.fail_at_step)")
            hold = config.get("hold")  # test hook: every rank waits mid-epoch (first attempt) for a node kill
            if hold and global_step == hold["step"] and checkpoint is None:
                hold_here(Path(hold["dir"]), rank, hold.get("seconds", 120.0))
            strategy.backward_step(out["loss"])
            global_step += 1
            t_end = time.perf_counter()
            losses.append(float(out["loss"].detach()))
            if tracker and (global_step % config.get("log_every", 10) == 0 or i == 0):
                step_s = t_end - t_wait
                samples = job.data.batch_size * world_size
                metrics = {f"train/{k}": float(v.detach().float().mean()) for k, v in out.items()}
                metrics.update({
                    "perf/samples_per_s": samples / step_s, "perf/frames_per_s": samples * n_frames / step_s,
                    "perf/data_wait_s": t_start - t_wait, "perf/compute_s": t_end - t_start,
                    "perf/peak_mem_mb": peak_memory_mb(device),
                    "perf/model_tflops_per_s": samples * flops_per_clip / step_s / 1e12,
                    "train/lr_head": scheduler.get_last_lr()[-1] if hasattr(scheduler, "get_last_lr") else 0.0,
                })
                if peak_flops:
                    metrics["perf/mfu"] = mfu(samples / world_size / step_s, flops_per_clip, peak_flops)
                tracker.log_metrics(metrics, step=global_step)
            t_wait = time.perf_counter()

        # -- validation (every rank embeds its shard; rank 0 scores, or all ranks under ZeRO-3) ----
        metrics = {"epoch": epoch, "global_step": global_step,
                   "train_loss": float(np.mean(losses)) if losses else float("nan")}
        last = epoch == job.train.epochs - 1
        if last or (epoch + 1) % job.train.eval_every == 0:
            metrics.update(score_split("val"))
        metrics = gather_objects(metrics)[0]               # rank 0's values on every rank: one decision
        score = metrics.get(job.train.select_metric)
        forced = config.get("select_scores")  # test hook: per-epoch validation scores, to pick a non-last epoch
        if forced is not None and epoch < len(forced):
            score = forced[epoch]
        improved = improves(score, best["score"], job.train.select_mode)
        if improved:
            best = {"epoch": epoch, "score": float(score)}
        metrics[SCORE_KEY] = float("nan") if score is None else float(score)
        metrics["best_epoch"] = -1 if best["epoch"] is None else best["epoch"]
        weights_epoch = epoch
        if rank == 0:
            print(epoch_line(epoch, job.train.epochs, global_step, metrics, len(losses) * job.data.batch_size
                             * world_size / max(time.perf_counter() - t_epoch, 1e-9),
                             (time.perf_counter() - t_run) / (epoch + 1 - start_epoch)), flush=True)

        # -- checkpoint + report (a collective in Ray Train V2) ---------------------------------
        # Ray uploads the directory to the run's storage during report; in local mode
        # (train.num_workers=0) nothing is uploaded, so the directory is kept under the work dir.
        tmp = tempfile.mkdtemp(prefix=f"ckpt-e{epoch}-r{rank}-", dir=config.get("local_checkpoint_root"))
        d = Path(tmp)
        strategy.save(d, {"epoch": epoch, "global_step": global_step, "best": best})
        torch.save({"torch": torch.get_rng_state()}, d / f"rng_rank{rank}.pt")
        if improved or (last and best["epoch"] is None):   # the selected epoch's checkpoint holds its weights
            state = strategy.export_state_dict(d)
            if state is not None:
                prefix = "method."
                torch.save({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                           d / EXPORT_FILE)
        if rank == 0:
            (d / STATE_FILE).write_text(json.dumps({"epoch": epoch, "global_step": global_step,
                                                    "metrics": metrics}))
        crash = config.get("crash") or {}  # test hook: rank 0 dies just before / after this report
        if rank == 0 and crash.get("epoch") == epoch and crash.get("when") == "before_report":
            raise RuntimeError(f"injected crash before the epoch-{epoch} report")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch={epoch:04d}")
        if not config.get("local_checkpoint_root"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            local_dirs[epoch] = tmp
        if rank == 0 and crash.get("epoch") == epoch and crash.get("when") == "after_report":
            time.sleep(2.0)
            raise RuntimeError(f"injected crash after the epoch-{epoch} report")
        # Logged once the checkpoint holding this epoch is reported, never before: a run that dies
        # earlier redoes the epoch, and one that dies in between logs it on resume (log_committed_epoch).
        log_epoch(tracker, metrics, global_step)
        if probe is not None and epoch == probe:
            report_probe(tracker, probe_step(strategy, module, device, job), global_step)
            return

    # -- test, once: the selected epoch's weights ---------------------------------------------
    if best["epoch"] is not None and best["epoch"] != weights_epoch:
        load_selected(strategy, best["epoch"], local_dirs)
    test = score_split("test")
    if tracker:
        tracker.log_metrics({**{f"final/test/{k}": v for k, v in test.items()},
                             "final/epoch": (best["epoch"] if best["epoch"] is not None else weights_epoch) + 1},
                            step=global_step)


def load_selected(strategy, epoch: int, local_dirs: dict[int, str]) -> None:
    """Load the checkpoint of ``epoch`` (the selected one, which Ray Train keeps by its score) into
    ``strategy`` on every rank: from the run's storage, or the kept local directory in local mode."""
    import ray.train

    if epoch in local_dirs:
        strategy.load(Path(local_dirs[epoch]))
        return
    for reported in ray.train.get_all_reported_checkpoints():
        if reported.metrics.get("epoch") == epoch:
            with reported.checkpoint.as_directory() as d:
                strategy.load(Path(d))
            return
    raise RuntimeError(f"the checkpoint of the selected epoch {epoch} is gone from the run's storage; "
                       "keep it: train.checkpoints_to_keep >= 1 keeps the best by validation")


def hold_here(folder: Path, rank: int, seconds: float) -> None:
    """Test hook: write ``<folder>/rank<r>`` (with this worker's Ray node id) and sleep, so a test can
    kill a node while every worker is mid-epoch; a worker that outlives the wait carries on."""
    import ray

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}").write_text(ray.get_runtime_context().get_node_id())
    time.sleep(seconds)


def epoch_line(epoch: int, epochs: int, step: int, metrics: dict[str, Any], samples_per_s: float,
               epoch_s: float) -> str:
    """The one line per epoch rank 0 prints (the CLI shows ``[tvr]`` lines, Ray's go to a file)."""
    left = int(round(epoch_s * (epochs - epoch - 1)))
    val = f"  val t2v_R1 {metrics['t2v_R1']:.1f}" if "t2v_R1" in metrics else ""
    if metrics.get("best_epoch", -1) >= 0 and "t2v_R1" in metrics:
        val += f" (best epoch {metrics['best_epoch'] + 1})"
    return (f"[tvr] epoch {epoch + 1}/{epochs}  step {step}  loss {metrics['train_loss']:.4f}{val}  "
            f"{samples_per_s:.1f} samples/s  ETA {left // 60}m{left % 60:02d}s")


def log_epoch(tracker, metrics: dict[str, Any], step: int) -> None:
    """An epoch's metrics to MLflow (rank 0), validation scores under ``val/`` (``val/num_videos``:
    how many videos were scored)."""
    if tracker:
        tracker.log_metrics({f"val/{k}" if k.startswith(SCORE_KEYS) else k: v
                             for k, v in metrics.items() if v == v or k != SCORE_KEY}, step=step)


def log_committed_epoch(tracker, state: dict[str, Any]) -> None:
    """On resume: log the restored checkpoint's epoch if the run that wrote it died before logging
    it (its ``epoch`` metric has no value at that step), so every epoch appears exactly once."""
    if "metrics" not in state:
        return
    logged = tracker.client.get_metric_history(tracker.run_id, "epoch")
    if not any(m.step == state["global_step"] for m in logged):
        log_epoch(tracker, state["metrics"], state["global_step"])


def report_probe(tracker, loss: float, step: int) -> None:
    """The probe loss goes to MLflow (rank 0): Ray Train V2 results keep checkpointed reports only."""
    if tracker:
        tracker.log_metrics({"probe_next_loss": loss}, step=step)


def probe_step(strategy, module: torch.nn.Module, device: torch.device, job: JobCfg) -> float:
    """One optimiser step on a fixed seeded batch, then its loss: equal after a resume only if
    weights, optimiser, scheduler and accumulation state were all restored exactly."""
    g = torch.Generator().manual_seed(1234)
    bb = module.method.backbone
    size, n = bb.image_size, job.data.batch_size
    frames = torch.randn(n, job.data.num_frames, 3, size, size, generator=g)
    text = bb.tokenize([f"probe caption {i}" for i in range(n)])
    for _ in range(job.train.grad_accum):
        strategy.backward_step(strategy(mode="loss", frames=frames.to(device), text=text.to(device))["loss"])
    with torch.no_grad():
        return float(strategy(mode="loss", frames=frames.to(device), text=text.to(device))["loss"])
