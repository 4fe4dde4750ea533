"""Every `tvr ...` command shown in README.md and docs/*.md exists as written: its subcommand and
options parse, each `key.sub=value` override names a key of the config tree, each jobs/ spec is
there; the cheap ones are run. docs/commands.md is the parser's own help."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(file:line, command) for each `tvr` command line inside a fenced code block."""
    out = []
    for doc in DOCS:
        fenced, pending, start = False, "", 0
        for no, raw in enumerate(doc.read_text().splitlines(), 1):
            if raw.strip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            line = raw.strip()
            if pending:
                line = pending + " " + line
            elif line.startswith((".venv/bin/tvr ", "$ tvr ")):
                line = line.split("tvr ", 1)[1]
                line = "tvr " + line
                start = no
            elif line.startswith("tvr "):
                start = no
            else:
                continue
            if line.endswith("\\"):
                pending = line[:-1].rstrip()
                continue
            pending = ""
            out.append((f"{doc.name}:{start}", re.split(r"\s+#\s", line, maxsplit=1)[0].strip()))
    return out


def _key_exists(key: str) -> bool:
    from tvr_platform.config import JobCfg

    cls: typing.Any = JobCfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
        if typing.get_origin(cls) is dict:  # free-form mappings (tune.search_space, cluster.env_vars)
            return i < len(parts)
        if typing.get_origin(cls) in (typing.Union, __import__("types").UnionType):
            cls = next((a for a in typing.get_args(cls) if a is not type(None)), cls)
    return not dataclasses.is_dataclass(cls)


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    files = {where.split(":")[0] for where, _ in COMMANDS}
    assert len(COMMANDS) >= 25 and {"README.md", "data.md", "laptop-to-cluster.md"} <= files


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses_and_names_real_keys(where, command):
    from tvr_platform.cli import build_parser
    from tvr_platform.specs import resolve_spec

    # placeholders: <value> -> x; optional parts ([key.sub=value ...], [...]) and "..." dropped
    plain = re.sub(r"\.\.\.", "", re.sub(r"\[[^\[\]]*\]", "", re.sub(r"<[^<>]+>", "x", command)))
    argv = shlex.split(plain)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{where}: `{command}` does not parse (exit {err.code})")
    overrides = list(getattr(args, "overrides", None) or [])
    spec = getattr(args, "spec", None) or getattr(args, "target", None)
    if spec and "=" in spec and not spec.endswith((".yaml", ".yml")):
        overrides.insert(0, spec)
    elif spec and spec.endswith((".yaml", ".yml")):
        assert resolve_spec(spec).is_file(), f"{where}: {spec} is not a shipped spec"
    for o in overrides:
        key = o.split("=", 1)[0]
        assert _key_exists(key), f"{where}: `{o}` names no key of the config tree"


def test_command_reference_is_the_parsers_help():
    from tvr_platform.cli import reference_markdown

    assert (ROOT / "docs" / "commands.md").read_text() == reference_markdown(), (
        "docs/commands.md is stale: regenerate it (see tvr_platform.cli.reference_markdown)")


def test_cheap_documented_commands_run(tmp_path, monkeypatch, capsys):
    """Those that touch no Ray and no network, in an empty directory (specs come from the package)."""
    from tvr_platform.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("quickstart", "train", "tune", "eval"))
    assert main(["config", "show", "jobs/train.yaml", "model.method=tmass", "model.tmass.support_weight=1.2"]) == 0
    shown = capsys.readouterr().out
    assert "name: train-tmass" in shown and "support_weight: 1.2" in shown
    assert main(["config", "show", "tune", "--raw"]) == 0
    assert "search_space:" in capsys.readouterr().out
    assert main(["submit", "jobs/train.yaml", "--dry-run", "train.epochs=1"]) == 0
    assert list(tmp_path.iterdir()) == []


def test_specs_ship_with_the_package():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"] == {"jobs": "tvr_platform/jobs"}
