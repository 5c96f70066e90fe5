"""The README's two set-up commands are the ones CI runs (litgpt's test_readme idea)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n(.*?)\n## ", text, re.S)
    assert block, "README.md lost its '## Quick start' section"
    return [line.strip() for line in re.findall(r"```bash\n(.*?)```", block.group(1), re.S)]


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "astrolom demo" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [line.strip() for line in ci]


def test_setup_pins_cpu_torch_and_is_idempotent_by_design():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "import torch" in setup  # an installed torch (CPU or CUDA) is never replaced
    assert "torch==${TORCH_VERSION}" in setup  # never an unpinned torch (would pull a multi-GB CUDA build)
