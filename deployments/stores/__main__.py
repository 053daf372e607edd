"""`python -m deployments.stores up|status|down`: the Ray driver `rma up` and `rma down` run as a child process
(a process that imports Ray caches the cluster's token settings, so the CLI itself never does).

up: ensure one supervisor per store, on trusted data donors when one is alive, else on the head (the embedded
default), and wait until each answers queries. Prints one JSON line per store; exit 1 if any failed.
down: stop each store cleanly (Postgres checkpoints, Redis fsyncs its AOF) and remove the supervisors; the volumes
and their data stay for the next `up`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from deployments.stores.kinds import KINDS
from deployments.stores.supervisor import NAMESPACE, TRUSTED_DATA, actor_name, ensure
from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED

ON_HEAD = {LABEL_TIER: "head"}
DEFAULT_STORES = ("redis", "postgres", "chroma", "graph")


def trusted_data_alive() -> bool:
    import ray

    for n in ray.nodes():
        labels = n.get("Labels") or {}
        if n.get("Alive") and labels.get(LABEL_TIER) == "data" and labels.get(LABEL_TRUSTED) == "true":
            return True
    return False


def placement(on: str) -> dict[str, str]:
    if on == "data":
        return TRUSTED_DATA
    if on == "head":
        return ON_HEAD
    return TRUSTED_DATA if trusted_data_alive() else ON_HEAD


def up(stores: list[str], runtime: str, on: str, wait_s: float, ports: dict[str, int] | None = None) -> int:
    import ray

    selector = placement(on)
    where = "a trusted data donor" if selector == TRUSTED_DATA else "the head"
    actors = {s: ensure(s, runtime=runtime, selector=selector, port=(ports or {}).get(s)) for s in stores}
    deadline = time.monotonic() + wait_s
    pending = dict(actors)
    failed = 0
    while pending and time.monotonic() < deadline:
        for store, actor in list(pending.items()):
            try:
                st = ray.get(actor.status.remote(), timeout=5)
            except ray.exceptions.GetTimeoutError:
                continue  # not placed yet (no node matches) or still constructing
            if st["status"] in ("ready", "failed"):
                pending.pop(store)
                failed += st["status"] == "failed"
                print(json.dumps({"store": store, "status": st["status"], "error": st["error"], "where": where,
                                  "node_ip": st["node_ip"], "port": st["port"], "ready_s": st["ready_s"]}),
                      flush=True)
        time.sleep(0.5)
    for store in pending:
        failed += 1
        reason = (f"no node matches {selector} (is a trusted data donor online?)" if selector == TRUSTED_DATA
                  else "still starting")
        print(json.dumps({"store": store, "status": "pending", "error": reason, "where": where}), flush=True)
    return 1 if failed else 0


def status(stores: list[str]) -> int:
    import ray

    for store in stores:
        try:
            actor = ray.get_actor(actor_name(store), namespace=NAMESPACE)
            st: dict[str, Any] = ray.get(actor.status.remote(), timeout=10)
        except ValueError:
            st = {"status": "absent"}
        except ray.exceptions.GetTimeoutError:
            st = {"status": "pending"}
        st.pop("labels", None)
        print(json.dumps({"store": store, **st}), flush=True)
    return 0


def down(stores: list[str], timeout: float) -> int:
    """Stop all stores at once (each flushes and exits), then remove their supervisors."""
    import ray

    actors = {}
    for store in stores:
        try:
            actors[store] = ray.get_actor(actor_name(store), namespace=NAMESPACE)
        except ValueError:
            continue
    refs = {store: a.stop.remote() for store, a in actors.items()}
    for store, ref in refs.items():
        try:
            ray.get(ref, timeout=timeout)
        except Exception as exc:  # already dead or unplaced: killing it is all that is left
            print(json.dumps({"store": store, "warning": f"clean stop failed: {exc}"[:300]}), flush=True)
        ray.kill(actors[store], no_restart=True)
        print(json.dumps({"store": store, "status": "stopped"}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.stores")
    p.add_argument("command", choices=["up", "status", "down"])
    p.add_argument("--stores", default=",".join(DEFAULT_STORES), help="comma-separated: " + ", ".join(KINDS))
    p.add_argument("--runtime", default="process", choices=["process", "docker"])
    p.add_argument("--on", default="auto", choices=["auto", "data", "head"])
    p.add_argument("--wait", type=float, default=180.0)
    p.add_argument("--port", action="append", default=[], metavar="STORE=PORT",
                   help="a store's port instead of its default (repeatable)")
    a = p.parse_args(argv)
    stores = [s for s in a.stores.split(",") if s]
    ports: dict[str, int] = {}
    for item in a.port:
        name, _, value = item.partition("=")
        if name not in KINDS or not value.isdigit() or not 0 < int(value) < 65536:
            print(f"error: --port {item!r}: use STORE=PORT with a store from {', '.join(KINDS)}", file=sys.stderr)
            return 2
        ports[name] = int(value)
    unknown = [s for s in stores if s not in KINDS]
    if unknown:
        print(f"error: unknown store(s) {', '.join(unknown)}; known: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    import ray

    ray.init(namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    try:
        if a.command == "up":
            return up(stores, a.runtime, a.on, a.wait, ports)
        if a.command == "status":
            return status(stores)
        return down(stores, a.wait)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
