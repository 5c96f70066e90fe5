"""One `astrolom` logger configured by the CLI; progress bars stay readable when stderr is a file."""

from __future__ import annotations

import logging

import pytest

from astrolom import log


@pytest.fixture(autouse=True)
def _restore_logger():
    logger = logging.getLogger(log.LOGGER_NAME)
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_progress_in_a_log_file_is_a_few_lines_not_one_per_step(capsys):
    log.configure(0)
    bar = log.progress(500, desc="steps", unit="step", interval_s=3600)
    for i in range(500):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}", refresh=False)  # as the training loops do, every step
    bar.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "\r" not in err
    assert 1 <= len(lines) <= 3, lines  # the first refresh and the final state, not 500 lines
    assert lines[-1].startswith("steps: 100%") and "500/500" in lines[-1]


def test_quiet_hides_progress_and_info_verbose_shows_debug(capsys):
    log.configure(-1)
    bar = log.progress(10, desc="hidden", interval_s=0)
    bar.update(10)
    bar.close()
    log.get_logger("astrolom.test").info("not shown")
    log.get_logger("astrolom.test").warning("shown")
    assert capsys.readouterr().err == "warning: shown\n"
    log.configure(1)
    log.get_logger("test").debug("debug line")  # names outside the package are put under it
    assert capsys.readouterr().err == "debug line\n"


def test_cli_flags_set_the_level(capsys):
    from astrolom.cli import main

    assert main(["-q", "presets"]) == 0
    assert logging.getLogger(log.LOGGER_NAME).level == logging.WARNING
    assert main(["--verbose", "presets"]) == 0
    assert logging.getLogger(log.LOGGER_NAME).level == logging.DEBUG
    assert "debug" in capsys.readouterr().out  # the command's own output still goes to stdout
