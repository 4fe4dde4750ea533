"""benchmarks/gpu_check.py (the prepared device check) runs end to end in its CPU smoke mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_gpu_check_tiny_prints_one_row_per_method(capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--tiny", "--methods", "meanp", "tmass"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["meanp", "tmass"]
    for r in rows[1:]:
        step_ms, clips_s = (float(x) for x in r.split("|")[2:4])
        assert step_ms > 0 and clips_s > 0
