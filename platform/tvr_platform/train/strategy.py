"""Training strategies applied from outside the single-device model: DeepSpeed (ZeRO 0-3) or DDP.

Both expose the same small surface to the loop: ``forward`` (the wrapped RetrievalStep),
``backward_step(loss)``, ``save(dir)``, ``load(dir)``, ``state_dict_for_export()`` and
``eval_module()`` (a context giving a plain module with full parameters for evaluation).

Nothing read back from run storage runs code: every checkpoint file is loaded with
``torch.load(weights_only=True)`` (:func:`safe_load`), DeepSpeed's shards included:
:class:`DeepSpeedStrategy` replaces its checkpoint engine's unrestricted load with :func:`safe_load`,
and every file ``engine.load_checkpoint`` reads (model states, ZeRO optimizer shards) goes through
that engine. The only DeepSpeed 0.19 loaders that call ``torch.load`` themselves are the universal-
checkpoint ones (``checkpoint.load_universal``), which :class:`DeepSpeedStrategy` refuses; tvr's
config (:func:`deepspeed_config`) never enables them. A tampered file fails the resume with
:class:`UnsafeCheckpointError` instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tvr_platform.config import TrainCfg


class CallForward:
    """A module called through ``forward`` (attributes pass through). Under ZeRO-3,
    ``unwrap_model_for_generation`` keeps the root module's forward pre-hook, whose ``reset_step``
    is a collective while DeepSpeed re-records its trace: rank 0, scoring alone, would wait there
    for the other ranks."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain data: refused, not run."""


def deepspeed_safe_globals() -> list[type]:
    """The plain-data classes DeepSpeed 0.19 pickles into its ZeRO optimizer shards (a loss-scaler
    record, the stage enum, fragment addresses): rebuilt from their fields, they call nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = "cpu", allow: list[type] = ()) -> Any:
    """``torch.load(weights_only=True)`` (+ the ``allow``-listed plain-data classes); anything else in
    the file (a pickled callable, a ``__reduce__`` payload) is refused before it can run."""
    import pickle

    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((ln.strip() for ln in str(err).splitlines() if "Unsupported" in ln or "global" in ln),
                      str(err).splitlines()[0])
        raise UnsafeCheckpointError(f"{path}: refusing to load a checkpoint that is not plain tensors "
                                    f"and data ({reason}); it was not written by tvr or was tampered with"
                                    ) from None


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def deepspeed_config(train: TrainCfg, micro_batch: int, bf16: bool) -> dict[str, Any]:
    """DeepSpeed JSON config from the typed training section (train_batch_size left to DeepSpeed:
    micro batch x grad_accum x world size, so a different worker count needs no edit)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {
            "stage": train.zero_stage,
            "overlap_comm": train.zero_stage > 0,
            "contiguous_gradients": train.zero_stage > 0,
            "stage3_gather_16bit_weights_on_model_save": train.zero_stage == 3,
        },
        "bf16": {"enabled": bf16},
        # A torch.optim AdamW is passed in: avoids JIT-building DeepSpeed's fused_adam on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def hold_scalars_as_vectors(module: nn.Module) -> set[str]:
    """Reshape every 0-dim parameter of ``module`` to shape [1] in place; returns their names."""
    names = set()
    for name, p in module.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
            names.add(name)
    return names


@contextlib.contextmanager
def zero3_init(ds_config: dict) -> Iterator[list[nn.Parameter]]:
    """``deepspeed.zero.Init``: parameters are partitioned as they are built, so no host holds the
    whole model. Yields the 0-dim parameters it met, which it holds as shape [1]: DeepSpeed 0.19
    broadcasts each new parameter as ``p.data.view(torch.uint8)``, impossible for a 0-dim tensor."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import Init

    held: list[nn.Parameter] = []
    original = Init._zero_init_param

    def zero_init_param(self, param):
        if param.dim() == 0:
            param.data = param.data.reshape(1)
            held.append(param)
        return original(self, param)

    Init._zero_init_param = zero_init_param
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield held
    finally:
        Init._zero_init_param = original


def open_state_dict(path: str) -> dict[str, torch.Tensor]:
    """An open_clip-format checkpoint as a lazily read state dict: ``.safetensors`` through
    ``safe_open`` and zip-format ``torch.save`` files memory-mapped (``mmap=True``,
    ``weights_only``), so a tensor's bytes are read only when it is copied. Other files (OpenAI's
    TorchScript archives, legacy pickles) go through :func:`tvr.backbone.read_checkpoint`, which
    holds their state dict in host memory. ``{"state_dict": ...}`` and DDP ``module.`` prefixes
    are unwrapped as open_clip does."""
    from tvr.backbone import read_checkpoint

    state: Any = None
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        f = safe_open(path, framework="pt", device="cpu")
        state = {k: _LazyTensor(f, k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    else:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # noqa: BLE001  (not a zip-format state dict: JIT archive, legacy pickle)
            state = None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            state = read_checkpoint(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class _LazyTensor:
    """One safetensors entry: shape known, bytes read by ``load()``."""

    def __init__(self, f, key: str):
        self.f, self.key = f, key
        self.shape = torch.Size(f.get_slice(key).get_shape())

    def load(self) -> torch.Tensor:
        return self.f.get_tensor(self.key)


def _full_shape(p: nn.Parameter) -> torch.Size:
    return torch.Size(getattr(p, "ds_shape", p.shape))


def load_pretrained_partitioned(model: nn.Module, path: str | None, rank: int) -> int:
    """Copy an open_clip-format checkpoint into ``model`` (an open_clip CLIP) whose parameters
    ZeRO-3 partitioned at construction (:func:`zero3_init`), without any host holding the whole
    model: rank 0 reads the (memory-mapped) checkpoint, and one module's parameters at a time are
    gathered (``GatheredParameters(modifier_rank=0)``), overwritten on rank 0 and re-partitioned,
    which broadcasts them to their owners. Only rank 0 needs ``path`` (other ranks pass None).

    Checked before anything is copied, on rank 0, with the verdict broadcast so that every rank
    raises together (no hang): every parameter has a checkpoint entry of its element count (0-dim
    entries fill the shape-[1] parameters :func:`zero3_init` holds), no entry is left over (the
    non-persistent ``attn_mask`` buffer is not a parameter). Returns the number of parameters
    loaded. Unlike open_clip's ``load_checkpoint`` there is no position-embedding resizing: a
    checkpoint of another grid or context length is an error."""
    import deepspeed
    import torch.distributed as dist

    state = open_state_dict(path) if rank == 0 else None
    error = None
    if rank == 0:
        params = dict(model.named_parameters())
        missing = [n for n in params if n not in state]
        extra = [k for k in state if k not in params and not k.endswith("attn_mask")]
        wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(_full_shape(p))}" for n, p in params.items()
                 if n in state and math.prod(state[n].shape) != _full_shape(p).numel()]
        if missing or extra or wrong:
            error = (f"model.backbone.pretrained: {path} does not fit this architecture (missing "
                     f"{missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}); check model.backbone.name")
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)
    count = 0
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    for name, p in own:
                        src = state[f"{prefix}.{name}" if prefix else name]
                        src = src.load() if isinstance(src, _LazyTensor) else src
                        p.data.copy_(src.reshape(p.shape).to(p.dtype))
        count += len(own)
    return count


class DeepSpeedStrategy:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ds_config: dict,
                 held_scalars: list[nn.Parameter] = ()):
        """``held_scalars``: the 0-dim parameters :func:`zero3_init` reshaped (ZeRO-3 only)."""
        import deepspeed

        if ds_config.get("checkpoint", {}).get("load_universal"):
            # DeepSpeed's universal-checkpoint loaders call torch.load themselves, past safe_load.
            raise ValueError("DeepSpeed checkpoint.load_universal is not supported: its loaders "
                             "unpickle checkpoint files without weights_only; resume from tvr's own checkpoints")
        self.ds_config = ds_config
        self.stage = ds_config["zero_optimization"]["stage"]
        # DeepSpeed 0.19 broadcasts every replicated parameter as p.data.view(torch.uint8), which a
        # 0-dim tensor (CLIP's logit_scale) cannot do. Hold such parameters as shape [1] inside the
        # engine (broadcasting keeps the maths identical) and give them back their shape on export.
        self.scalars = ({n for n, p in module.named_parameters() if any(p is h for h in held_scalars)}
                        if self.stage == 3 else hold_scalars_as_vectors(module))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        # DeepSpeed's TorchCheckpointEngine.load unpickles without restriction; every file that
        # load_checkpoint reads (model states, ZeRO optimizer shards) goes through safe_load instead.
        allow = deepspeed_safe_globals()
        self.engine.checkpoint_engine.load = (
            lambda path, map_location=None: safe_load(path, map_location, allow))

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward + (at the accumulation boundary) clip, step and schedule; True if stepped."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        return boundary

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: Path, client_state: dict) -> None:
        # Collective: every rank writes its own ZeRO shards (rank-unique file names).
        self.engine.save_checkpoint(str(directory), tag="ds", client_state=client_state)

    def load(self, directory: Path) -> dict:
        # Must read one shared directory on every rank (a per-rank temp dir hangs the run).
        _, client_state = self.engine.load_checkpoint(str(directory), tag="ds")
        return client_state or {}

    def export_state_dict(self, checkpoint_dir: Path) -> dict[str, torch.Tensor] | None:
        """Consolidated weights on rank 0 (None elsewhere). A collective: call it on every rank.

        ZeRO-3 shards are gathered in memory by DeepSpeed (``save_16bit_model``: the compute dtype,
        bf16 on GPU, fp32 on CPU); reading the shards back from disk would need every rank's files
        in one directory."""
        rank = self.engine.global_rank
        if self.stage == 3:
            name = "consolidated.pt"
            self.engine.save_16bit_model(str(checkpoint_dir), name)
            state = None
            if rank == 0:
                state = safe_load(checkpoint_dir / name)
                (checkpoint_dir / name).unlink()
        else:
            state = self.engine.module.state_dict() if rank == 0 else None
        if state is None:
            return None
        return {k: v.detach().cpu().reshape(()) if k in self.scalars else v.detach().cpu()
                for k, v in state.items()}

    @contextlib.contextmanager
    def eval_module(self) -> Iterator[nn.Module]:
        self.engine.eval()
        if self.stage == 3:
            # DeepSpeed's own context for inference inside a ZeRO-3 engine: every parameter gathered
            # once, the per-module fetch/release hooks removed (put back on exit). Without it every
            # forward was a collective, so ranks with uneven evaluation shards hung the run.
            from deepspeed.runtime.zero import unwrap_model_for_generation

            with unwrap_model_for_generation(self.engine):
                yield CallForward(self.engine.module)
        else:
            yield self.engine.module
        self.engine.train()


class DDPStrategy:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, train: TrainCfg,
                 autocast_dtype: torch.dtype | None):
        import ray.train.torch

        self.module = module
        self.model = ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"find_unused_parameters": True})
        self.optimizer, self.scheduler, self.train_cfg = optimizer, scheduler, train
        self.autocast_dtype = autocast_dtype
        self._micro = 0

    def __call__(self, *args, **kwargs):
        if self.autocast_dtype is None:
            return self.model(*args, **kwargs)
        with torch.autocast(device_type="cuda", dtype=self.autocast_dtype):
            return self.model(*args, **kwargs)

    def backward_step(self, loss: torch.Tensor) -> bool:
        self._micro += 1
        boundary = self._micro % self.train_cfg.grad_accum == 0
        (loss / self.train_cfg.grad_accum).backward()
        if boundary:
            if self.train_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.train_cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return boundary

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def save(self, directory: Path, client_state: dict) -> None:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "client_state": client_state},
                       directory / "ddp.pt")

    def load(self, directory: Path) -> dict:
        state = safe_load(directory / "ddp.pt")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client_state"]

    def export_state_dict(self, checkpoint_dir: Path) -> dict[str, torch.Tensor] | None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    @contextlib.contextmanager
    def eval_module(self) -> Iterator[nn.Module]:
        self.module.eval()
        yield self.module
        self.module.train()
