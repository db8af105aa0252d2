"""README.md: the two opening commands, every setting with its default, and the CI entry point."""

import re
from pathlib import Path

import train_gpt

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_opens_with_main_and_test_commands():
    commands = re.findall(r"```\n(.+?)\n```", README)
    assert commands[0] == "python3 -m pip install -r requirements.txt && bash run.sh"
    assert commands[1] == "python3 -m pip install -r requirements.txt -r requirements-dev.txt && python3 -m pytest -q tests"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "grep -m 1 '^python3 -m pip install -r requirements.txt -r requirements-dev.txt' README.md" in ci
    assert "torch==2.13.0" in ci


def test_every_setting_documented_with_its_default():
    for name, default, _ in train_gpt.SETTINGS:
        shown = train_gpt.env_form(default) if default != "" else "(empty)"
        assert f"| `{name}` | `{shown}` |" in README, name


def test_run_sh_uses_reference_settings():
    script = (REPO / "run.sh").read_text()
    for setting in ('USE_UNIVERSAL:-1', 'UNIVERSAL_UNIQUE_BLOCKS:-3', 'UNIVERSAL_ITERATIONS:-4', 'NGRAM_EVAL:-0',
                    'KNN_LAMBDA:-0', 'SEED:-42', 'OMP_NUM_THREADS:-1', 'NPROC:-8'):
        assert setting in script
    assert "torchrun --standalone --nproc_per_node=\"$NPROC\" train_gpt.py" in script


def test_requirements_admit_the_tested_torch_versions():
    spec = next(line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("torch"))
    low, high = re.match(r"torch>=([\d.]+),<([\d.]+)", spec).groups()
    for version in ("2.11", "2.13"):
        assert tuple(map(int, low.split("."))) <= tuple(map(int, version.split("."))) < tuple(map(int, high.split(".")))
