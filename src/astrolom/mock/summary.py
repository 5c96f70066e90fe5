"""The summary a survey run writes beside its shards (`_survey.json`): counts and label ranges, gathered as the
shards stream past."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SUMMARY_LABELS = (
    "redshift",
    "log_mstar",
    "log_ssfr",
    "g_minus_r",
    "r_minus_z",
    "mag_r",
    "r_half_arcsec",
    "psf_fwhm_r",
    "quenched",
    "edge_on",
    "has_spectrum",
)


class RunningStats:
    """Counts per split × telescope and min / mean / max of the summary labels, in O(1) memory."""

    def __init__(self) -> None:
        self.n = 0
        self.counts = {(s, t): 0 for s in ("train", "val", "test") for t in ("north", "south")}
        self.lo = dict.fromkeys(SUMMARY_LABELS, math.inf)
        self.hi = dict.fromkeys(SUMMARY_LABELS, -math.inf)
        self.sum = dict.fromkeys(SUMMARY_LABELS, 0.0)

    def update(self, res: Mapping[str, Any]) -> None:
        self.n += len(res["split"])
        for s, t in zip(res["split"], res["telescope"], strict=True):
            self.counts[s, t] += 1
        for k in SUMMARY_LABELS:
            a = np.asarray(res[k], dtype=float)
            self.lo[k] = min(self.lo[k], float(a.min()))
            self.hi[k] = max(self.hi[k], float(a.max()))
            self.sum[k] += float(a.sum())


def survey_summary(stats: RunningStats, files, elapsed, workers) -> dict[str, Any]:
    """The `_survey.json` summary: object counts per split and telescope, label ranges, files, time, workers."""
    counts: dict[str, Any] = {"total": stats.n}
    for s in ("train", "val", "test"):
        counts[s] = {t: stats.counts[s, t] for t in ("north", "south")}
        counts[s]["total"] = counts[s]["north"] + counts[s]["south"]
    label_stats = {
        k: {"min": stats.lo[k], "mean": stats.sum[k] / max(stats.n, 1), "max": stats.hi[k]} for k in SUMMARY_LABELS
    }
    return {"counts": counts, "label_stats": label_stats, "files": files, "seconds": elapsed, "workers": workers}
