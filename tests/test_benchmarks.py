"""The GPU benchmark runs end to end at tiny size on CPU (`--dry-run`), so it is ready when a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_mfu_dry_run_measures_both_implementations(tmp_path):
    pytest.importorskip("astropt.model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_mfu.py"), "--dry-run", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| debug | ours |" in out.stdout and "| debug | reference astropt 2.0.9 |" in out.stdout
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["ours", "reference astropt 2.0.9"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows)  # no MFU without a known GPU peak
    assert rows[0]["params"] == rows[1]["params"]  # one FLOP count for the same architecture
