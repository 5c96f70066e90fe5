"""The mock survey draws the same objects it drew before it became a package (`astrolom.mock`, 2026-12-04).

`mock_reference.json` holds a fingerprint of a small survey computed with the single-module simulator
(`astrolom.data.survey`) that the package replaced: the catalogue of 40 objects (every label and render parameter),
4 rendered objects (image, spectrum flux, ivar, mask) and the shards of a 6-object survey read back from Parquet.
Floats are compared as sums and weighted sums with a relative tolerance of 1e-9, so any change in the physics,
the random streams or the rendering fails, while last-bit differences of another BLAS/FFT build do not.
Strings (object ids, splits, telescopes) and booleans are compared exactly.

Regenerate (only for an intended change of the mock's output, and say so in the commit):
    PYTHONPATH=src python tests/test_survey_reference.py > tests/mock_reference.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).with_name("mock_reference.json")
RTOL = 1e-9


def _stats(values) -> dict:
    """Exact digest for strings and booleans; [sum |x|, sum x, sum x w] for numbers (w fixed, order-sensitive)."""
    a = np.asarray(values)
    if a.dtype == object or a.dtype.kind in "USb":
        return {"digest": hashlib.sha256(json.dumps([str(v) for v in a.ravel()]).encode()).hexdigest()[:16]}
    x = np.nan_to_num(a.astype(np.float64).ravel(), nan=-7.0)  # masked spectrum pixels are NaN: count them
    w = np.cos(0.37 * np.arange(x.size))
    return {"shape": list(a.shape), "sums": [float(np.abs(x).sum()), float(x.sum()), float((x * w).sum())]}


def fingerprint(mock) -> dict:
    """Fingerprint of a small survey drawn by `mock` (any module exposing the simulator's public API)."""
    cat = mock.sample_catalogue(40, seed=5, start=3)
    out: dict = {"catalogue": {k: _stats(v) for k, v in sorted(cat.items())}}
    objects = {}
    for rec in mock.generate_objects(4, size=32, seed=2, start=10):
        objects[rec.object_id] = {
            "image": _stats(rec.image),
            **{
                name: _stats(getattr(rec, name))
                for name in ("spectrum", "spectrum_ivar", "spectrum_mask")
                if getattr(rec, name) is not None
            },
            "labels": {k: _stats([v]) for k, v in sorted(rec.labels.items())},
        }
    out["objects"] = objects
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        mock.generate_survey(Path(tmp) / "s", n=6, size=32, seed=7, workers=1, shard_size=4, progress=False)
        table = pq.read_table(Path(tmp) / "s")
    shards = {}
    for name in table.column_names:
        col = table.column(name).to_pylist()
        if name == "image":
            col = [np.frombuffer(b, "<f4") for b in col]
        elif name.startswith("spectrum"):
            dtype = np.uint8 if name == "spectrum_mask" else "<f4"
            col = [np.full(1, -9.0) if b is None else np.frombuffer(b, dtype).astype(np.float64) for b in col]
        if col and isinstance(col[0], np.ndarray):
            shards[name] = _stats(np.concatenate(col))
        else:
            shards[name] = _stats(col)
    out["shards"] = shards
    return out


def _compare(got, want, path: str, failures: list[str]) -> None:
    if isinstance(want, dict) and "sums" in want:
        if got.get("shape") != want["shape"]:
            failures.append(f"{path}: shape {got.get('shape')} != {want['shape']}")
            return
        scale = max(want["sums"][0], 1e-300)
        for i, (g, w) in enumerate(zip(got["sums"], want["sums"], strict=True)):
            if abs(g - w) > RTOL * scale:
                failures.append(f"{path}: sum[{i}] {g!r} != {w!r}")
    elif isinstance(want, dict):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            failures.append(f"{path}: missing keys {missing}, new keys {extra}")
        for k in sorted(set(want) & set(got)):
            _compare(got[k], want[k], f"{path}/{k}", failures)
    elif got != want:
        failures.append(f"{path}: {got!r} != {want!r}")


def test_the_package_draws_the_same_survey_as_the_module_it_replaced():
    from astrolom import mock

    failures: list[str] = []
    _compare(fingerprint(mock), json.loads(REFERENCE.read_text()), "", failures)
    assert failures == [], "\n".join(failures[:20])


def test_the_comparison_fails_on_a_change_in_the_last_digits_that_matter():
    want = {"x": _stats(np.array([1.0, 2.0, 3.0])), "s": _stats(np.array(["a", "b"], dtype=object))}
    failures: list[str] = []
    _compare({"x": _stats(np.array([1.0, 2.0, 3.0])), "s": want["s"]}, want, "", failures)
    assert failures == []
    _compare({"x": _stats(np.array([1.0, 2.0, 3.0 + 1e-7])), "s": want["s"]}, want, "", failures)
    assert len(failures) == 3  # the sum, the absolute sum and the weighted sum all moved
    failures.clear()
    _compare({"x": _stats(np.array([1.0, 3.0, 2.0])), "s": _stats(np.array(["b", "a"], dtype=object))}, want, "",
             failures)  # fmt: skip
    assert [f.split(":")[0] for f in failures] == ["/s/digest", "/x"]  # a permutation is seen by the weights


if __name__ == "__main__":
    from astrolom import mock as _module

    json.dump(fingerprint(_module), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
