"""What the terminal shows: tvr's own lines; Ray's, MLflow's and the libraries' logs go to a file.

By default (no ``-v``) the CLI calls :func:`quiet` once: the ``ray``, ``mlflow``, ``alembic`` and
warning loggers stop writing to the terminal and are buffered until the job's work dir is known
(:func:`attach`, called by ``init_ray`` and ``start_run``), then written to
``<run.work_dir>/logs/tvr-<UTC time>-<pid>.log``. Lines that Ray forwards from its workers and
actors go to the same file, except tvr's own (``[tvr] ...``: the one line per epoch of rank 0),
which are printed without Ray's ``(RayTrainWorker pid=...)`` prefix. ``tvr -v`` shows everything as
before. :func:`restore` undoes it all (the CLI calls it when the command returns).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

TVR_PREFIX = "[tvr]"
LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "py.warnings", "open_clip")
_state: dict = {}


def quiet() -> None:
    """Send library logs to a buffer (later: the work dir's log file) instead of the terminal."""
    if _state:
        return
    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    buffer.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _state.update(buffer=buffer, removed=[], propagate={}, file=None, ray_handler=False)
    _strip()
    out = logging.getLogger("tvr.output")
    out.setLevel(logging.INFO)
    out.propagate = False
    out.addHandler(buffer)
    logging.captureWarnings(True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _strip() -> None:
    """(Again, after ray / mlflow configured their loggers on import) terminal handlers -> buffer."""
    for name in LOGGERS:
        lg = logging.getLogger(name)
        _state["propagate"].setdefault(name, lg.propagate)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
                _state["removed"].append((name, h))
        if _state["buffer"] not in lg.handlers:
            lg.addHandler(_state["buffer"])
        lg.propagate = False


@contextlib.contextmanager
def captured():
    """While quiet, what a library prints itself (not through logging) goes to the log too."""
    if not _state:
        yield
        return
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield
    for line in buf.getvalue().splitlines():
        if line.strip():
            logging.getLogger("tvr.output").info("%s", line)


def is_quiet() -> bool:
    return bool(_state)


def log_file() -> Path | None:
    """The log file, once something was written to it."""
    path = _state.get("file")
    if path is not None and _state.get("buffer") is not None:
        _state["buffer"].flush()
    return path if path is not None and path.exists() else None


def attach(work_dir: str | os.PathLike) -> Path | None:
    """Write the buffered and all later library logs to a new file under ``work_dir/logs``."""
    if not _state:
        return None
    _strip()
    if _state["file"] is not None:
        return _state["file"]
    path = Path(work_dir) / "logs" / f"tvr-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    target = logging.FileHandler(path, encoding="utf-8", delay=True)  # no file until something is logged
    target.setFormatter(_state["buffer"].formatter)
    _state["buffer"].setTarget(target)
    _state["buffer"].flush()
    _state.update(file=path, target=target)
    return path


def route_ray_worker_logs() -> None:
    """Replace Ray's printing of worker/actor output on the driver: ``[tvr]`` lines to stdout, the
    rest to the log file. Call after ``ray.init`` (a no-op unless :func:`quiet` is on)."""
    if not _state or _state["ray_handler"]:
        return
    from ray._private import worker as ray_worker

    _strip()
    logger = logging.getLogger("tvr.output")

    recent: collections.deque = collections.deque(maxlen=32)

    def handle(data: dict) -> None:
        who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        for line in data.get("lines", []):
            if line.startswith(TVR_PREFIX):
                # Ray Train V2 echoes a worker's print() through its own logger too: show it once.
                if (data.get("pid"), line) not in recent:
                    recent.append((data.get("pid"), line))
                    print(line, file=sys.stdout, flush=True)
            else:
                logger.info("%s %s", who, line)

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    _state["ray_printed"] = any(n == "ray_print_logs" for n, _ in dispatcher.handlers)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("tvr_print_logs", handle)
    _state["ray_handler"] = True


def restore() -> None:
    """Back to the libraries' own terminal logging (the CLI's exit, tests)."""
    if not _state:
        return
    for name, propagate in _state["propagate"].items():
        logging.getLogger(name).removeHandler(_state["buffer"])
        logging.getLogger(name).propagate = propagate
    for name, h in _state["removed"]:
        if h not in logging.getLogger(name).handlers:
            logging.getLogger(name).addHandler(h)
    logging.getLogger("tvr.output").removeHandler(_state["buffer"])
    logging.captureWarnings(False)
    if _state["ray_handler"]:
        import functools

        from ray._private import worker as ray_worker

        ray_worker.global_worker_stdstream_dispatcher.remove_handler("tvr_print_logs")
        if _state.get("ray_printed"):
            ray_worker.global_worker_stdstream_dispatcher.add_handler(
                "ray_print_logs", functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False))
    _state["buffer"].flush()
    if _state.get("target"):
        _state["target"].close()
    _state.clear()
