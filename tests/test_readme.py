"""The README's two set-up commands stay true: CI runs the test command verbatim,
and the main job's config parses."""

import re
from pathlib import Path

from cifarlens.config import RunConfig, load_yaml, merge

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_opens_with_a_main_job_and_a_test_command():
    main_job, test_command = setup_commands()[:2]
    assert "cifarlens train" in main_job and "pip install" in main_job
    assert test_command.endswith("pytest") and "pip install" in test_command


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = setup_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_configs_parse():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        merge(RunConfig(), load_yaml(path))  # raises on unknown keys or wrong types
