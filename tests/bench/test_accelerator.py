"""The accelerator benchmark runs end to end at CI size on whatever JAX runs on here."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_accelerator_benchmark_runs_small_and_its_scan_selects_as_float32(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(ROOT / "bench" / "accelerator.py"), "--small", "--no-p2"]
    command += ["--batch", "32", "--repeats", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stdout, done.stdout
    report = json.loads(out.read_text())
    assert report["peak_tflops"]["float32"] > 0
    variants = {(row["problem"], row["variant"]) for row in report["rows"]}
    assert len(variants) == 9  # 3 problems x (Gram, matrix-free float32, matrix-free bfloat16)
    for row in report["rows"]:
        assert row["same_as_f32"] == 1.0, row
        assert row["rows_per_s"] > 0 and math.isfinite(row["rel_err"]), row
        if row["scan"] == "bfloat16":
            assert row["scan_check"]["selections"] > 0
            assert row["scan_check"]["differ"] == 0, row  # seeded and deterministic here
