"""The one fault-injection switch for tests: ``ASTROLOM_FAULT=<point>:<step>`` SIGKILLs the process there.

Points (every trainer names the same ones, so a resume test reads alike for pretraining, fine-tuning and alignment):

    after-step:N      at the end of optimiser step N, after its metrics row and any checkpoint of that step
    in-checkpoint:N   halfway through writing the checkpoint of step N (weights written, optimiser state not yet)

Several points may be given, comma-separated. SIGKILL, not an exception: nothing gets to clean up, as in a crash.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "ASTROLOM_FAULT"
AFTER_STEP = "after-step"
IN_CHECKPOINT = "in-checkpoint"


def fault_env(point: str, step: int) -> dict[str, str]:
    """The environment entry that kills a child process at `point` of step `step` (for subprocess env=)."""
    if point not in (AFTER_STEP, IN_CHECKPOINT):
        raise ValueError(f"unknown fault point {point!r}; use {AFTER_STEP!r} or {IN_CHECKPOINT!r}")
    return {FAULT_ENV: f"{point}:{step}"}


def fault_point(point: str, step: int) -> None:
    """SIGKILL this process if `ASTROLOM_FAULT` names `point` at `step`; otherwise nothing."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted and f"{point}:{step}" in (w.strip() for w in wanted.split(",")):
        os.kill(os.getpid(), signal.SIGKILL)
