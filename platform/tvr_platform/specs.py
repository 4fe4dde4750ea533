"""The job specs tvr ships (``jobs/*.yaml``), found from a checkout or an installed wheel.

The wheel carries ``jobs/`` as ``tvr_platform/jobs`` (pyproject ``force-include``), so
``tvr train jobs/train.yaml`` works in an empty directory too: a spec path that is not a file but
names a shipped spec (``jobs/train.yaml``, ``train.yaml`` or ``train``) loads the shipped one.
Specs in sub-folders are named by their path under ``jobs/`` (the paper recipes:
``jobs/repro/xpool.yaml`` = ``repro/xpool``). ``tvr config list`` / ``tvr config show NAME
[overrides]`` print them.
"""

from __future__ import annotations

import os
from pathlib import Path


def jobs_dir() -> Path:
    """``<checkout>/jobs`` when running from a checkout, else the copy inside the package."""
    here = Path(__file__).resolve().parent
    repo = here.parents[1] / "jobs"
    return repo if repo.is_dir() else here / "jobs"


def shipped() -> dict[str, Path]:
    """name (path under jobs/ without .yaml: ``train``, ``repro/xpool``) -> path of every shipped spec."""
    root = jobs_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def resolve_spec(spec: str | os.PathLike) -> Path:
    """``spec`` itself when it is a file; else the shipped spec it names (``jobs/<name>.yaml``,
    ``<name>.yaml`` or ``<name>``); else ``spec`` unchanged (the loader reports it missing)."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix in ("", ".yaml", ".yml") and not path.is_absolute():
        parts = path.with_suffix("").parts
        name = "/".join(parts[1:] if parts[:1] == ("jobs",) else parts)
        found = shipped().get(name)
        if found is not None:
            return found
    return path


def header(path: Path) -> str:
    """The spec's first comment line that is not a usage line (what it is), for ``tvr config list``."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return next((line for line in lines if line and not line.startswith("tvr ")), "")
