"""Heartbeats per second a single coordinator process sustains, on SQLite and on PostgreSQL.

Starts `rma admission serve` (one process, as on a free-tier host), registers simulated donors through the real
API, then drives heartbeats with `wrk` (Debian package; each request carries one donor's node token, rotating
over all donors) and prints heartbeats/s and p50/p99 latency. Nothing is asserted: this prints figures.

    .venv/bin/python -m bench.admission_heartbeats [--donors 2000] [--seconds 15] [--connections 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from rma_ray import credentials
from tests.support import free_port, run_postgres, wait_for

CAPS = {"cpu_cores": 4, "ram_mb": 16000, "disk_free_gb": 100}
LUA = """
local tokens = {}
for line in io.lines("%s") do tokens[#tokens + 1] = line end
local i = 0
local body = '{"status":"healthy","current_load":0.25,"available_memory_mb":12000}'
request = function()
  i = i %% #tokens + 1
  return wrk.format("POST", "/api/worker/heartbeat",
    {["Authorization"] = "Bearer " .. tokens[i], ["Content-Type"] = "application/json"}, body)
end
"""


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_case(name: str, db_url: str, donors: int, seconds: int, connections: int) -> dict[str, float]:
    admin = credentials.mint(credentials.Kind.ADMIN).token
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="rma-bench-"))
    env = {
        **os.environ,
        "RMA_ADMIN_KEY": admin,
        "RMA_DATABASE_URL": db_url,
        "RMA_DATA_DIR": str(data),
        "RMA_REGISTER_RATE": "1000000/minute",
        "RMA_AUTH_FAILURE_RATE": "1000000/minute",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "rma_ray.cli", "admission", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, timeout=60, what="coordinator")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as http:
            token = http.post("/api/invites", json={"uses": donors, "ttl_s": 3600}).json()["token"]
            node_tokens = [
                http.post(
                    "/api/worker/register",
                    json={"name": f"sim{i}", "capabilities": CAPS},
                    headers={"Authorization": f"Bearer {token}"},
                ).json()["node_token"]
                for i in range(donors)
            ]
        tokens_file = data / "tokens.txt"
        tokens_file.write_text("\n".join(node_tokens) + "\n")
        script = data / "hb.lua"
        script.write_text(LUA % tokens_file)
        subprocess.run(
            ["wrk", "-t1", "-c", str(connections), "-d", "3s", "-s", str(script), url],
            capture_output=True,
            check=True,
        )  # warm-up: caches and connection pool
        out = subprocess.run(
            ["wrk", "-t1", "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s", str(script), url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as http:
            online = http.get("/api/admin/stats").json()["online_workers"]
        return _parse_wrk(out) | {"online": float(online)}
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def run_baseline(seconds: int, connections: int) -> dict[str, float]:
    """The same request to a bare FastAPI route (pydantic body, no auth, no state) on the same uvicorn: the
    ceiling for this box, measured in the same run so that the ratio survives a noisy machine."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench._baseline_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    data = Path(tempfile.mkdtemp(prefix="rma-bench-"))
    try:
        wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, timeout=60, what="baseline app")
        (data / "tokens.txt").write_text("rma_node_x\n")
        script = data / "hb.lua"
        script.write_text(LUA % (data / "tokens.txt"))
        subprocess.run(
            ["wrk", "-t1", "-c", str(connections), "-d", "3s", "-s", str(script), url],
            capture_output=True,
            check=True,
        )
        out = subprocess.run(
            ["wrk", "-t1", "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s", str(script), url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return _parse_wrk(out) | {"online": float("nan")}
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def _parse_wrk(out: str) -> dict[str, float]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": _ms(lat["50"]),
        "p99": _ms(lat["99"]),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--donors", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--only", choices=["sqlite", "postgres"])
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    results = {"bare route": run_baseline(args.seconds, args.connections)}
    if args.only in (None, "sqlite"):
        tmp = Path(tempfile.mkdtemp(prefix="rma-bench-db-"))
        try:
            results["sqlite"] = run_case(
                "sqlite", f"sqlite:///{tmp / 'c.db'}", args.donors, args.seconds, args.connections
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.only in (None, "postgres"):
        with run_postgres() as pg:
            results["postgres"] = run_case(
                "postgres", pg.create_database(), args.donors, args.seconds, args.connections
            )
    print(
        f"\nheartbeats to one coordinator process: {args.donors} donors, {args.connections} connections, "
        f"{args.seconds} s, wrk on the same {os.cpu_count()}-core machine"
    )
    base = results["bare route"]
    print(
        f"{'server':<11} {'heartbeats/s':>13} {'x bare':>7} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
        f"{'online after':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:<11} {r['rps']:>13.0f} {r['rps'] / base['rps']:>7.2f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
            f"{r['errors']:>8.0f} {r['online']:>13.0f}"
        )
    print(
        "bare route = the same request to a FastAPI route with no auth and no state, same uvicorn, same run"
    )
    print("target: >= 5,000/s with p99 < 50 ms (150,000 donors at a 30 s interval)")


if __name__ == "__main__":
    main()
