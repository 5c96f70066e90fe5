"""The `astrolom` logger and progress bars that stay readable in a log file.

Library code logs to `get_logger(__name__)` (children of the `astrolom` logger) and never configures logging; the
`astrolom` command does, once, with `configure(verbosity)` from its `--verbose` / `--quiet` flags. Command results
(tables, paths written) are printed to stdout; progress and diagnostics go to stderr through the logger.

`progress(...)` is tqdm: a live bar on a terminal; where stderr is not a terminal (a log file, CI, a batch job) the
bar becomes a log line every `interval_s` seconds (default 30), so a log file gets a handful of lines with rate and
ETA instead of one line per step. Quiet mode (`--quiet`) hides the bars.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

LOGGER_NAME = "astrolom"
NON_TTY_INTERVAL_S = 30.0
_FORMAT = "%(message)s"


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """A logger under `astrolom` (pass the module's `__name__`)."""
    if name != LOGGER_NAME and not name.startswith(LOGGER_NAME + "."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def configure(verbosity: int = 0) -> logging.Logger:
    """Set up the `astrolom` logger: -1 (--quiet) warnings only, 0 info, 1 (--verbose) debug. Idempotent."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logger = logging.getLogger(LOGGER_NAME)
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger


class _LogLines:
    """A file for tqdm that turns each refresh into one log line (no carriage returns in log files)."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.logger.info(line)

    def flush(self) -> None:
        pass


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(
    total: int | None = None,
    *,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    interval_s: float = NON_TTY_INTERVAL_S,
    logger: logging.Logger | None = None,
    **kwargs,
) -> tqdm:
    """A tqdm bar: live on a terminal, a log line every `interval_s` s otherwise, hidden when quiet or not `enabled`.

    Extra keyword arguments go to tqdm (`initial`, `smoothing`, ...).
    """
    logger = logger or get_logger()
    # quiet only when the command asked for it: a library caller who configured nothing still sees a terminal bar
    level = logging.getLogger(LOGGER_NAME).level
    disable = not enabled or (level != logging.NOTSET and level > logging.INFO)
    if _is_tty():
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        file=_LogLines(logger),
        mininterval=interval_s,
        maxinterval=max(interval_s, 10.0),
        ascii=True,
        ncols=100,
        **kwargs,
    )
