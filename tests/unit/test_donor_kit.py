"""The donor kit's pure parts: the version comparison of `rma version --check`, the pins, the code fingerprint,
and the install script the coordinator renders (shellcheck-clean, refusing bad options and a wheel whose sha256
differs before it touches anything). The real install runs in tests/e2e/test_donor_install.py."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from importlib import metadata as md
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from admission.errors import ApiError
from admission.services import donor_kit
from rma_ray import dists
from rma_ray.wire import DonorVersions

HEAD = DonorVersions(pool="0.1.0", revision="aaaa", ray="2.60.0", python="3.11.7", wheel="w.whl")


@pytest.mark.parametrize(
    ("here", "expected"),
    [
        (
            {"python": "3.11.2"},
            None,
        ),  # the patch release may differ: Ray is started with the minor match level
        ({"python": "3.12.1"}, "Python 3.12 here, 3.11 on the head"),
        ({"ray": "2.59.0"}, "Ray 2.59.0 here, Ray 2.60.0 on the head"),
        ({"revision": "bbbb"}, "the pool's code differs (revision bbbb here, aaaa on the head)"),
        ({"pool": "0.2.0", "revision": "bbbb"}, "rma-pool 0.2.0 here, 0.1.0 on the head"),
        ({"ray": "2.59.0", "python": "3.12.0"}, "Python 3.12 here, 3.11 on the head; Ray 2.59.0 here"),
    ],
)
def test_mismatch_names_what_differs_in_one_line(here: dict[str, str], expected: str | None) -> None:
    got = dists.mismatch(HEAD.model_copy(update=here), HEAD)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expected) and "\n" not in got


def test_pins_drop_local_labels_and_the_fingerprint_covers_only_the_donors_modules() -> None:
    assert dists.public_version("2.13.0+cpu") == "2.13.0"
    assert dists.public_version("2026.10.19.post1") == "2026.10.19.post1"
    files = [("rma_ray/a.py", b"x"), ("deployments/b.py", b"y")]
    rev = dists.code_revision(files)
    noise = [("admission/c.py", b"z"), ("rma_ray/x.pyc", b"0"), ("rma_pool-0.1.0.dist-info/RECORD", b"r")]
    assert dists.code_revision(list(reversed(files)) + noise) == rev
    assert dists.code_revision([("rma_ray/a.py", b"x!"), ("deployments/b.py", b"y")]) != rev


def test_the_closure_pins_ray_and_leaves_the_pool_out() -> None:
    pins = dists.closure()
    assert pins["ray"][1] == md.version("ray")
    assert "rma-pool" not in pins and "fastapi" in pins


@pytest.fixture
def script(tmp_path: Path) -> Path:
    kit = donor_kit.Kit(Path("rma_pool-0.1.0-py3-none-any.whl"), "0" * 64, HEAD, "ray==2.60.0\n")
    path = tmp_path / "install.sh"
    path.write_text(donor_kit.script(kit, "http://pool.example.org:8470", overlay=True))
    return path


def test_the_rendered_script_is_posix_sh_and_shellcheck_clean(script: Path) -> None:
    text = script.read_text()
    assert "RMA_POOL_URL=http://pool.example.org:8470" in text and "RMA_WHEEL_SHA256=" + "0" * 64 in text
    assert "RMA_PYTHON=3.11" in text and "@HEAD_VALUES@" not in text
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    res = subprocess.run([shellcheck, "-s", "sh", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--extras", "head"], "unknown extra 'head' (a donor may ask for: overlay,services)"),
        (["--extras"], "--extras needs a value"),
    ],
)
def test_the_script_refuses_bad_options_before_it_touches_anything(
    script: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    res = subprocess.run(
        ["sh", str(script), *args],
        capture_output=True,
        text=True,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 1
    assert res.stderr.startswith(f"rma install: error: {message}") and res.stderr.count("\n") == 1
    assert list(home.iterdir()) == []


def test_the_script_refuses_a_wheel_whose_sha256_differs_and_installs_nothing(tmp_path: Path) -> None:
    """The coordinator (here a plain HTTP server on 127.0.0.1) serves a wheel whose bytes are not the ones the
    script's sha256 names: one line says so, the exit is 1, and nothing is made under HOME."""
    import http.server
    import platform
    import threading

    wheel = "rma_pool-0.1.0-py3-none-any.whl"
    served = tmp_path / "served"
    (served / "donor").mkdir(parents=True)
    (served / "donor" / wheel).write_bytes(b"PK not the wheel the head built")
    (served / "donor" / "constraints.txt").write_text("ray==2.60.0\n")
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        head = HEAD.model_copy(update={"python": platform.python_version()})  # this Python passes the check
        kit = donor_kit.Kit(Path(wheel), hashlib.sha256(b"the wheel the head built").hexdigest(), head, "")
        script = tmp_path / "install.sh"
        script.write_text(donor_kit.script(kit, url, overlay=False))
        home = tmp_path / "home"
        home.mkdir()
        res = subprocess.run(
            ["sh", str(script)],
            capture_output=True,
            text=True,
            env={"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "RMA_NO_UV": "1"},
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert f"/donor/{wheel}" in " ".join(asked)  # it did download the wheel
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr == (
        f"rma install: error: {wheel} from {url} does not match its sha256 in this script: run it again\n"
    )
    assert list(home.iterdir()) == []  # no venv, no RMA_HOME, no ~/.local/bin/rma


def _state(tmp_path: Path, *, beside_head: bool = True) -> Any:
    settings = SimpleNamespace(donor_kit=beside_head, data_dir=tmp_path)
    return SimpleNamespace(settings=settings, donor_kit=None, donor_kit_failure=None)


def _fake_build(tmp_path: Path, calls: list[Path]) -> Any:
    def build(cache: Path) -> donor_kit.Kit:
        calls.append(cache)
        wheel = tmp_path / "rma_pool-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"wheel")
        return donor_kit.Kit(wheel, "0" * 64, HEAD, "")

    return build


def test_a_coordinator_away_from_its_head_refuses_the_kit(tmp_path: Path) -> None:
    with pytest.raises(ApiError) as err:
        donor_kit.get(_state(tmp_path, beside_head=False))
    assert err.value.status == 404 and "served by `rma up` coordinators only" in err.value.message


def test_a_request_during_a_build_gets_503_with_retry_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(donor_kit, "_LOCK_WAIT_S", 0.01)
    with donor_kit._lock, pytest.raises(ApiError) as err:  # another request is building
        donor_kit.get(_state(tmp_path))
    assert err.value.status == 503 and err.value.headers.get("Retry-After")
    assert "building" in err.value.message


@pytest.mark.parametrize(
    "exc", [dists.ClosureError("ray is required but not installed here"), OSError(28, "nope")]
)
def test_a_failed_build_is_a_503_with_its_reason_remembered_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    calls: list[Path] = []

    def fail(cache: Path) -> donor_kit.Kit:
        calls.append(cache)
        raise exc

    monkeypatch.setattr(donor_kit, "_build", fail)
    state = _state(tmp_path)
    for _ in range(2):
        with pytest.raises(ApiError) as err:
            donor_kit.get(state)
        assert err.value.status == 503 and err.value.code == "donor_kit_unavailable"
        assert str(exc) in err.value.message
    assert len(calls) == 1  # the second answer came from memory
    state.donor_kit_failure = (state.donor_kit_failure[0] - donor_kit._FAILURE_TTL_S, "old")
    monkeypatch.setattr(donor_kit, "_build", _fake_build(tmp_path, calls))
    assert donor_kit.get(state).wheel.is_file() and len(calls) == 2


def test_a_kit_whose_wheel_was_deleted_is_built_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(donor_kit, "_build", _fake_build(tmp_path, calls))
    state = _state(tmp_path)
    kit = donor_kit.get(state)
    assert donor_kit.get(state) is kit and len(calls) == 1
    kit.wheel.unlink()
    assert donor_kit.get(state).wheel.is_file() and len(calls) == 2


def test_the_error_script_prints_the_reason_and_fails(tmp_path: Path) -> None:
    path = tmp_path / "install.sh"
    path.write_text(donor_kit.error_script("it's 'quoted' $(no) `expansion`\nhere"))
    res = subprocess.run(["sh", str(path)], capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == "rma install: error: it's 'quoted' $(no) `expansion` here\n"


def test_a_repacked_wheel_is_readable_by_anyone(tmp_path: Path) -> None:
    """A donor's pip runs as the donor's user: a wheel packed by root (through a 0600 temp file) must be 0644,
    and it is a real wheel of the installed distribution."""
    import zipfile

    from rma_ray import dists

    wheel = dists.repack("idna", tmp_path, compression=zipfile.ZIP_STORED)
    assert wheel.stat().st_mode & 0o777 == 0o644
    with zipfile.ZipFile(wheel) as zf:
        assert any(n.endswith(".dist-info/RECORD") for n in zf.namelist())
    assert not list(tmp_path.glob("*.tmp"))


def test_the_pools_wheel_is_the_same_bytes_when_built_again(tmp_path: Path) -> None:
    """Two builds of one source (two coordinators, or a rebuilt cache) give one sha256 (SOURCE_DATE_EPOCH)."""
    from rma_ray import dists

    source = dists.editable_source()
    if source is None:
        pytest.skip("the pool is installed from a wheel here: the kit repacks that wheel, no build")
    shas = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        donor_kit._pip_wheel(source, tmp_path / f"src{i}", out)
        (wheel,) = out.glob("*.whl")
        shas.append(hashlib.sha256(wheel.read_bytes()).hexdigest())
    assert shas[0] == shas[1]
