"""The doc tests' pool: one real `rma up` (Ray head with token auth, Serve, the coordinator on SQLite, the
Postgres and Redis stores; no Serve apps: the client page deploys the vision route's front) in a temp HOME with
free ports, and the three machines the pages talk about (head, donor, client) as shells with their own HOME,
working directory and exported variables. About 50 s to start on the
2-core box; package-scoped, torn down by PID (`rma down`, which the admin page itself runs last)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rma_ray.net import local_ip_towards
from tests.docs.mdblocks import Block
from tests.support import GiveUp, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@dataclass
class Shell:
    """One machine of the docs: blocks run in bash with this HOME and cwd; what one exports, the next sees."""

    name: str
    home: Path
    work: Path
    env: dict[str, str]
    background: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.home.parent / f"{self.name}.exports"

    def script(self, body: str, keep_state: bool) -> str:
        save = (
            f'\nexport -p > "{self.state}.new" && mv "{self.state}.new" "{self.state}"\n'
            f'pwd > "{self.state}.cwd"\n'
        )
        return (
            f'set -eo pipefail\n[ -f "{self.state}" ] && . "{self.state}"\n'
            f'cd "$(cat "{self.state}.cwd" 2>/dev/null || echo "{self.work}")"\n'
            f"{body}" + (save if keep_state else "\n")
        )


@dataclass
class DocPool:
    info: dict[str, Any]
    root: Path
    stores_dir: Path
    proc: subprocess.Popen[bytes]
    shells: dict[str, Shell]
    _client: dict[str, str] = field(default_factory=dict)
    _donor_id: str = ""

    # -- the pool's real values behind the docs' placeholders --

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = httpx.request(
            method,
            self.info["coordinator_url"] + path,
            headers={"Authorization": f"Bearer {self.info['admin_key']}"},
            timeout=30,
            **kw,
        )
        r.raise_for_status()
        return r

    def join_token(self) -> str:
        invite = self.admin("POST", "/api/invites", json={"ttl_s": 900, "uses": 1, "note": "doc tests"})
        return invite.json()["token"]  # type: ignore[no-any-return]

    def client(self) -> dict[str, str]:
        if not self._client:
            self._client = self.admin("POST", "/api/admin/clients", json={"name": "doc-tests"}).json()
        return self._client

    def donor_id(self) -> str:
        """A donor in the registry for the admin commands that take an id: registered through the real API
        with this machine's probe (a registry record without a Ray node: drain and revoke act on the record)."""
        if not self._donor_id:
            from rma_ray import capabilities

            caps = capabilities.probe("/").model_dump(mode="json")
            r = httpx.post(
                self.info["coordinator_url"] + "/api/worker/register",
                timeout=30,
                json={"name": "doc-donor", "capabilities": caps},
                headers={"Authorization": f"Bearer {self.join_token()}"},
            )
            assert r.status_code == 201, r.text
            self._donor_id = r.json()["worker_id"]
        return self._donor_id

    def placeholders(self, text: str) -> dict[str, str]:
        """Placeholder -> value, for the placeholders this text uses (join tokens are fresh per block)."""
        i = self.info
        stores = i.get("stores", {})
        table = {
            "http://HEAD:8470": i["coordinator_url"],
            "http://HEAD:8000": i["serve_url"],
            "http://HEAD:8265": i["ray_dashboard_url"],
            "HEAD:6380": i["ray_address"],
            **{
                f"-h HEAD -p {default}": f"-h {st.get('node_ip')} -p {st.get('port')}"
                for st, default in ((stores.get("postgres", {}), 5440), (stores.get("redis", {}), 6390))
            },
            "/var/lib/rma/stores": str(self.stores_dir),
            "rma_admin_...": i["admin_key"],
        }
        out = {k: v for k, v in table.items() if k in text}
        if "rma_join_..." in text or "JOIN_TOKEN" in text:
            out["rma_join_..."] = out["JOIN_TOKEN"] = self.join_token()
        if "rma_client_..." in text or "CLIENT_KEY" in text:
            out["rma_client_..."] = out["CLIENT_KEY"] = self.client()["key"]
        if "CLIENT_KEY_ID" in text:
            out["CLIENT_KEY_ID"] = self.client()["id"]
        if "INVITE_ID" in text:
            invite = self.admin("POST", "/api/invites", json={"ttl_s": 900, "note": "doc tests"})
            out["INVITE_ID"] = invite.json()["id"]
        if "DONOR_ID" in text:
            out["DONOR_ID"] = self.donor_id()
        if "ADMIN_KEY" in text:
            out["ADMIN_KEY"] = i["admin_key"]
        return out

    def secrets(self) -> list[str]:
        return [s for s in (self.info.get("admin_key"), self._client.get("key")) if s]

    def mask(self, text: str) -> str:
        for s in self.secrets():
            text = text.replace(s, s[:20] + "…")
        return text

    # -- running a block --

    def run(self, block: Block) -> None:
        shell = self.shells[block.role]
        values = self.placeholders(block.text + " " + block.options.get("stdin", ""))
        text = block.text
        for k in sorted(values, key=len, reverse=True):  # JOIN_TOKEN before ..._TOKEN-like shorter keys
            if k not in ("JOIN_TOKEN", "CLIENT_KEY", "ADMIN_KEY"):
                text = text.replace(k, values[k])
        if block.lang == "python":
            py = shell.home.parent / f"block-{block.line}.py"
            py.write_text(text)
            body = f'python3 "{py}"\n'
        else:
            body = text
        stdin = values[block.options["stdin"]] + "\n" if "stdin" in block.options else None
        timeout = int(block.options.get("timeout", 180))
        where = f"{block.id} (on the {block.role})"
        if "background" in block.options:
            log = shell.home.parent / f"background-{block.line}.log"
            proc = subprocess.Popen(
                ["bash", "-c", shell.script(body, keep_state=False)],
                env=shell.env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=open(log, "wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            if stdin:
                assert proc.stdin is not None
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            shell.background.append((proc, log))

            def ready() -> bool:
                out = log.read_text(errors="replace")
                if proc.poll() is not None:
                    raise GiveUp(f"{where} exited with {proc.returncode}:\n{self.mask(out)}")
                return block.options["ready"] in out

            wait_for(
                ready, timeout=timeout, interval=0.5, what=f"{where} to print {block.options['ready']!r}"
            )
            return
        r = subprocess.run(
            ["bash", "-c", shell.script(body, keep_state=True)],
            env=shell.env,
            input=stdin,
            stdin=None if stdin else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = r.stdout + r.stderr
        want = int(block.options.get("exit", 0))
        assert r.returncode == want, (
            f"{where} exited {r.returncode} (expected {want}):\n{self.mask(text)}\n"
            f"--- output ---\n{self.mask(out)[-4000:]}"
        )
        if "expect" in block.options:
            assert block.options["expect"] in out, (
                f"{where}: output lacks {block.options['expect']!r}:\n{self.mask(out)[-4000:]}"
            )

    def stop_background(self) -> None:
        for shell in self.shells.values():
            for proc, _log in shell.background:
                if proc.poll() is None:  # as Ctrl-C would: the agent drains, unregisters and stops its node
                    os.killpg(proc.pid, signal.SIGINT)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait(10)
            shell.background.clear()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RMA_", "RAY_", "PG", "VIRTUAL_ENV"))}
    env.update(
        HOME=str(home),
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        COLUMNS="200",
        PYTHONDONTWRITEBYTECODE="1",
        **extra,
    )
    return env


@pytest.fixture(scope="package")
def docpool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocPool]:
    """`rma up --stores postgres,redis --apps none --no-edge` with free ports (~50 s here); torn down by PID at the
    end of the package. The admin page ends with `rma down`: teardown only stops what is still running."""
    if not shutil.which("pg_dumpall") or not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("Debian postgresql is not installed (`make test` installs it)")
    root = tmp_path_factory.mktemp("docs")
    stores = Path(tempfile.mkdtemp(prefix="rma-docs-stores-"))
    stores.chmod(0o755)  # the postgres user must traverse it
    ip = local_ip_towards("192.0.2.1")
    shells = {}
    for name in ("head", "donor", "client"):
        home, work = root / name / "home", root / name / "work"
        home.mkdir(parents=True)
        work.mkdir(parents=True)
        extra = {"RMA_STORES_DIR": str(stores)} if name == "head" else {}
        shells[name] = Shell(name, home, work, _env(home, **extra))
    from PIL import Image  # the client page's sample picture (`-F image=@photo.jpg`)

    Image.new("RGB", (64, 48), (220, 20, 20)).save(shells["client"].work / "photo.jpg")
    head = shells["head"]
    data_dir = head.home / ".local" / "share" / "rma"

    def start(attempt: int) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        args = [
            "--node-ip-address",
            ip,
            "--gcs-port",
            str(free_port(ip)),
            "--dashboard-port",
            str(free_port(ip)),
            "--coordinator-port",
            str(free_port(ip)),
            "--serve-port",
            str(free_port(ip)),
            "--stores",
            "postgres,redis",
            "--store-port",
            f"postgres={free_port(ip)}",
            "--store-port",
            f"redis={free_port(ip)}",
            "--apps",
            "none",
            "--no-edge",  # the edge's ports are fixed: a pool beside this one (another test run) would clash
        ]
        log = root / f"up-{attempt}.log"
        proc = subprocess.Popen(
            [str(VENV_BIN / "rma"), "up", *args],
            env=head.env,
            cwd=head.work,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)

        def up() -> dict[str, Any] | None:
            if proc.poll() is not None:
                logs = "".join(
                    f"\n--- {f.name} ---\n{f.read_text(errors='replace')[-3000:]}"
                    for f in sorted((data_dir / "logs").glob("*.log"))
                    if f.name != "ray-head.log"
                )
                raise GiveUp(f"rma up exited: {log.read_text()}{logs}")
            p = data_dir / "pool.json"
            return json.loads(p.read_text()) if p.exists() and '"stores"' in p.read_text() else None

        info = wait_for(up, timeout=300, interval=0.5, what="rma up to start the pool and its stores")
        ready = {s: v["status"] for s, v in info["stores"].items()}
        assert ready == {"postgres": "ready", "redis": "ready"}, log.read_text()
        return proc, info

    procs: list[subprocess.Popen[bytes]] = []
    pool: DocPool | None = None
    try:
        try:
            proc, info = start(1)
        except GiveUp:  # a start that failed cleaned up after itself (`rma up` stops what it started)
            # Ray's 30 s node registration and Serve's start can time out on an overloaded 2-core box
            proc, info = start(2)
        pool = DocPool(info, root, stores, proc, shells)
        yield pool
    finally:
        if pool is not None:
            pool.stop_background()
        for proc in procs:
            if proc.poll() is None:
                subprocess.run(
                    [str(VENV_BIN / "rma"), "down"], env=head.env, capture_output=True, timeout=300
                )
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        for pidfile in stores.glob("*/.rma-pid.json"):  # a store `rma down` failed to stop
            try:
                psutil.Process(json.loads(pidfile.read_text())["pid"]).kill()
            except (psutil.Error, OSError, ValueError, KeyError):
                pass
        shutil.rmtree(stores, ignore_errors=True)
