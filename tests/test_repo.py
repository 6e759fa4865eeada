"""The README's two commands stay true: CI runs exactly its test command."""

import re

from conftest import REPO


def _readme_commands():
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    test_command = next(line for line in ci.splitlines() if line.startswith("python3 -m pytest"))
    assert any(test_command in block for block in _readme_commands()[:2])


def test_readme_main_job_uses_existing_config_and_script():
    main_job = _readme_commands()[0]
    config = re.search(r"--config=(\S+)", main_job).group(1)
    script = re.search(r"python3? (scripts/\S+\.py)", main_job).group(1)
    assert (REPO / config).is_file() and (REPO / script).is_file()
