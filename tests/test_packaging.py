"""CI runs what README tells a new user to run: README's install and test lines appear verbatim in `.ci/run`,
and the Triton range the extra allows is the one README states."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def readme_install_commands() -> list[str]:
    """The commands of README's Install block, comments stripped, PyTorch's own step left out (CI machines
    take the CPU wheel from their disk)."""
    readme = read("README.md")
    section = readme[readme.index("## Install\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.splitlines():
        command = line.split("#", 1)[0].strip()
        if command and not command.startswith("pip install torch"):
            commands.append(command)
    return commands


def ci_lines() -> set[str]:
    return {line.strip() for line in read(".ci", "run").splitlines()}


def test_readme_install_and_test_commands_run_verbatim_in_ci():
    commands = readme_install_commands()
    assert 'pip install -e ".[test]" --no-build-isolation' in commands
    assert "python -m pytest -q tests" in commands
    missing = [c for c in commands if c not in ci_lines()]
    assert not missing, f".ci/run does not run README's commands verbatim: {missing}"


def test_ci_pins_no_triton_before_readmes_install():
    run = read(".ci", "run")
    before = run[: run.index('pip install -e ".[test]" --no-build-isolation')]
    commands = [line.split("#", 1)[0] for line in before.splitlines()]
    assert not any("triton" in c.lower() for c in commands), "a Triton pin hides what a fresh install gets"


def test_triton_range_is_the_one_readme_states():
    spec = re.search(r"'triton([^;']*)", read("setup.py")).group(1)
    assert spec == ">=3.6,<3.10"
    assert f"`{spec}`" in read("README.md")
