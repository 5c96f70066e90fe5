"""docs/walkthrough.md runs as written: its `bash` blocks, in order, in one shell, at a small N.

The first block's `ASTROLOM=`, `ORACLE=` and `N=` lines are pointed at this checkout, the installed astropt 1.0.4
oracle and a small survey; the block that starts the explorer (`astrolom serve`, which runs until stopped) is left
out (tests/test_serve.py covers it). The asserts read what the steps wrote, so a step that stops doing its job fails
here even if it exits 0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "walkthrough.md"
ORACLE = Path(os.environ.get("ASTROLOM_ASTROPT1_DIR", ROOT / ".oracles" / "astropt-1.0.4"))
N = 60


def walkthrough_script(n: int, oracle: Path) -> str:
    """The page's bash blocks joined into one script, with the set-up variables replaced."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, f"{DOC} has no bash blocks"
    settings = {"ASTROLOM": str(ROOT), "ORACLE": str(oracle), "N": str(n)}
    for name, value in settings.items():
        pattern = rf"^{name}=\S+"
        assert re.search(pattern, blocks[0], re.M), f"the first block of {DOC.name} no longer sets {name}"
        blocks[0] = re.sub(pattern, f"{name}={value}", blocks[0], count=1, flags=re.M)
    return "set -euo pipefail\n" + "\n".join(b for b in blocks if "astrolom serve" not in b)


def test_walkthrough_script_keeps_every_step():
    script = walkthrough_script(N, ORACLE)
    steps = [
        "convert --from-hub",
        "embed --model models/paper0001M --data cutouts",
        "survey ",
        "index ",
        "search --index",
        "outliers ",
        "probe ",
    ]
    missing = [s for s in steps if s not in script]
    assert not missing, f"{DOC.name} lost the steps {missing}"
    assert "astrolom serve" not in script and "astrolom serve" in DOC.read_text()
    assert re.search(rf"^N={N}\s", script, re.M) and re.search(rf"^ASTROLOM={ROOT}\s", script, re.M)


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path):
    if not (ORACLE / "astropt").is_dir():
        pytest.skip(f"astropt 1.0.4 oracle not installed at {ORACLE} (run scripts/setup.sh --dev)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        ["bash", "-c", walkthrough_script(N, ORACLE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr

    # step 1: the released layout converted through the Hub cache into an astrolom model of the paper's 0001M size
    config = json.loads((tmp_path / "models" / "paper0001M" / "config.json").read_text())
    assert "1,198,592 parameters" in out and "tokens preset paper2024" in out
    assert (tmp_path / "hub" / "astrolom-converted").is_dir()
    assert config["model"]["n_layer"] == 4 and config["model"]["n_embd"] == 128

    # step 2: both real photographs embedded, one 128-d row each, finite and different
    from astrolom.eval.embeddings import load_embeddings

    photos = load_embeddings(tmp_path / "cutouts.parquet")
    assert photos.X.shape == (2, 128) and np.isfinite(photos.X).all()
    assert not np.allclose(photos.X[0], photos.X[1])

    # steps 3-4: every galaxy embedded and indexed; the photograph's 5 neighbours are galaxies of the survey
    galaxies = load_embeddings(tmp_path / "galaxies.parquet")
    assert galaxies.X.shape == (N, 128)
    ids = set(map(str, galaxies.object_id))
    ranked = re.findall(r"^\s*\d+\s+(mls-\S+)\s+(-?[0-9.]+)", out, re.M)
    assert len(ranked) >= 5 + 5  # search -k 5, then outliers --top 5
    assert {oid for oid, _ in ranked} <= ids
    sims = [float(s) for _, s in ranked[:5]]
    assert sims == sorted(sims, reverse=True)

    # step 5: a redshift probe scored on the test split with both methods
    probes = json.loads((tmp_path / "photoz" / "probes.json").read_text())
    scores = probes["results"]["pretrained"]["redshift"]
    assert set(scores) == {"linear", "knn"}
    assert probes["targets"]["redshift"]["n_test"] == int((np.asarray(galaxies.split) == "test").sum()) > 0
    assert all(np.isfinite(s["mae"]) and 0 < s["mae"] < 0.2 for s in scores.values())
    # ... and scored as the field reports photo-z: the per-object table and its sigma_NMAD / bias / eta, printed
    metrics = json.loads((tmp_path / "photoz" / "predictions" / "prediction_metrics.json").read_text())["metrics"]
    assert {m["method"] for m in metrics} == {"linear", "knn"}
    for m in metrics:
        assert m["n"] == probes["targets"]["redshift"]["n_test"] and 0 < m["sigma_nmad"] < 0.2
        assert abs(m["bias"]) < 0.1 and 0 <= m["eta"] <= 1
        assert f"{m['sigma_nmad']:.4f}" in out  # the table `astrolom metrics` printed
