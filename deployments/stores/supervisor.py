"""The supervisor actor: one per store, detached and named `rma-store-<store>` in namespace `rma`, restarted by
Ray forever (`max_restarts=-1`), placed only on trusted data-tier nodes by label selector. It starts (or adopts)
the store, checks readiness with a real query, restarts the store if it dies, and answers `endpoint()` for the
services and `status()` for the registry.

Least exposure: `endpoint()` hands the store's password only to a caller on a trusted node (labelled
`rma.io/trusted=true`, or the Ray head, which is the operator's machine); anyone else gets a refusal. The
caller names its node, so this stops honest misplacement (a replica of a store-reading deployment scheduled
on an untrusted donor), not a hostile member of the same cluster: that boundary is the core/edge split
(SECURITY.md). Where the node runs the overlay, the store's port is firewalled to trusted nodes
(firewall.py)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from deployments.stores.firewall import StoreFirewall, trusted_addresses, wanted
from deployments.stores.kinds import KINDS, Endpoint, credentials, dir_size
from deployments.stores.runtime import RUNTIMES, StoreError, make_runtime
from rma_ray.settings import Settings
from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED
from rma_ray.waiting import GiveUp, WaitTimeout, wait_until

NAMESPACE = "rma"
REPORT_EVERY_S = 10.0  # the coordinator shows a store as `unknown` after three missed reports
log = logging.getLogger("rma.stores")
TRUSTED_DATA = {LABEL_TIER: "data", LABEL_TRUSTED: "true"}
HEAD_RESOURCE = "node:__internal_head__"


def node_is_trusted(node: dict[str, Any] | None) -> bool:
    """A `ray.nodes()` entry: alive and labelled trusted, or the Ray head."""
    if not node or not node.get("Alive"):
        return False
    labels, resources = node.get("Labels") or {}, node.get("Resources") or {}
    return labels.get(LABEL_TRUSTED) == "true" or HEAD_RESOURCE in resources


def _ray_node(node_id: str) -> dict[str, Any] | None:
    import ray

    return next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)


def actor_name(store: str) -> str:
    return f"rma-store-{store}"


class StoreSupervisor:
    def __init__(
        self, store: str, runtime: str = "process", port: int | None = None, data_dir: str | None = None
    ) -> None:
        import ray

        if store not in KINDS:
            raise ValueError(f"unknown store {store!r}; known: {', '.join(KINDS)}")
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; use one of: {', '.join(RUNTIMES)}")
        self.kind = KINDS[store]
        ctx = ray.get_runtime_context()
        self.node_id, self.labels = ctx.get_node_id(), ctx.get_node_labels()
        self.host = ray.util.get_node_ip_address()
        root = Path(data_dir) if data_dir else Settings().resolved_stores_dir
        self.volume = root / store
        self.volume.mkdir(parents=True, exist_ok=True)
        self.port = port or self.kind.default_port
        self.creds = credentials(self.volume)
        # the store's port: open to trusted nodes only, where this node runs the overlay (firewall.py)
        self.firewall = StoreFirewall(store, self.port, wanted(Settings().data_dir))
        self.runtime_name = runtime
        # one id per incarnation of this actor: containers started by an earlier incarnation are orphans
        self.incarnation = f"{ctx.get_actor_id() or 'driver'}:{os.getpid()}:{int(time.time())}"
        self.state, self.error, self.restarts = "starting", None, 0
        try:
            self.runtime: Any = make_runtime(
                runtime, self.kind, self.volume, self.host, self.port, self.creds
            )
        except (
            StoreError
        ) as exc:  # e.g. no Docker on this node: say so in status(), do not crash-loop the actor
            self.runtime, self.state, self.error = None, "failed", str(exc)
        self.ready_s: float | None = None
        self.adopted = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        if self.runtime is not None:
            self._thread.start()
        self._reporter = threading.Thread(target=self._report_loop, daemon=True)
        self._reporter.start()

    def _endpoint(self) -> Endpoint:
        return self.kind.endpoint(self.host, self.port, self.creds)  # type: ignore[no-any-return]

    def _bring_up(self) -> None:
        t0 = time.monotonic()
        self.adopted = self.runtime.adopt()
        reconcile = getattr(self.runtime, "reconcile_orphans", None)
        if reconcile is not None:  # docker: remove containers of this store that no live supervisor owns
            reconcile(self.incarnation)
        if not self.adopted:
            self.runtime.start()

        def answers() -> bool:
            if not self.runtime.alive():
                raise GiveUp(
                    f"{self.kind.name} exited while starting; see {self.volume}/{self.kind.name}.log"
                )
            return bool(self.kind.ready(self._endpoint()))  # raises while not accepting queries yet

        try:
            wait_until(answers, timeout=120, interval=0.2, what=f"{self.kind.name} to answer a query")
        except GiveUp as exc:
            raise StoreError(str(exc)) from None
        except WaitTimeout:
            raise StoreError(f"{self.kind.name} did not answer a query within 120 s") from None
        self.ready_s = time.monotonic() - t0
        self.state, self.error = "ready", None
        self._ready.set()

    def _supervise(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            if self.state != "ready":
                try:
                    self._bring_up()
                    delay = 1.0
                except Exception as exc:  # StoreError says what to fix; anything else: its type and text
                    self.state = "failed"
                    self.error = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
                    self.runtime.stop(5)
                    self._stop.wait(delay)
                    delay = min(60.0, delay * 2)
                    continue
            if not self.runtime.alive():
                self.state, self.error = "restarting", f"{self.kind.name} {self.runtime.name} exited"
                self._ready.clear()
                self.restarts += 1
                continue
            self._stop.wait(1.0)

    # -- the actor's API ---------------------------------------------------------------------------------

    def endpoint(self, timeout: float = 120.0, node_id: str | None = None) -> dict[str, Any]:
        """Host, port and credentials, once the store answers queries (raises with the reason otherwise), to a
        caller on a trusted node only."""
        if not node_id or not node_is_trusted(_ray_node(node_id)):
            log.warning(
                "refused %s's credentials to a caller on node %s (not a trusted node)",
                self.kind.name,
                (node_id or "?")[:12],
            )
            raise StoreError(
                f"{self.kind.name}'s credentials go only to trusted nodes (rma.io/trusted=true "
                f"or the head); node {(node_id or '?')[:12]} is not one: place this deployment "
                f"on trusted nodes"
            )
        if not self._ready.wait(timeout):
            raise StoreError(self.error or f"{self.kind.name} is not ready yet")
        return self._endpoint().__dict__.copy()

    def status(self) -> dict[str, Any]:
        return {
            "name": self.kind.name,
            "runtime": self.runtime_name,
            "node_id": self.node_id,
            "node_ip": self.host,
            "labels": self.labels,
            "status": self.state,
            "error": self.error,
            "pid": self.runtime.pid if self.runtime else None,
            "port": self.port,
            "size_bytes": dir_size(self.volume),
            "ready_s": self.ready_s,
            "restarts": self.restarts,
            "adopted": self.adopted,
            "supervisor_pid": os.getpid(),
            "firewall": self.firewall.state,
        }

    def stop(self) -> None:
        self._stop.set()
        if self.runtime is not None:
            self.runtime.stop()
        self.firewall.remove()
        self.state = "stopped"
        self._report()

    # -- reporting to the coordinator (registry page, GET /api/admin/stores) ------------------------------

    def _report(self) -> bool:
        """PUT this store's status to the coordinator with this node's credential; never the store's password."""
        import httpx

        from rma_ray.identity import NoIdentity, local_identity

        try:
            ident = local_identity()
        except NoIdentity:
            return False  # a bare test cluster: nobody to tell
        st = self.status()
        body = {
            "runtime": st["runtime"],
            "status": st["status"],
            "error": (st["error"] or None) and st["error"][:2000],
            "node_id": st["node_id"],
            "node_ip": st["node_ip"],
            "port": st["port"],
            "size_bytes": st["size_bytes"],
            "restarts": st["restarts"],
            "ready_s": st["ready_s"],
        }
        try:
            r = httpx.put(
                f"{ident.coordinator_url}/api/stores/{self.kind.name}",
                json=body,
                timeout=5,
                headers={"Authorization": f"Bearer {ident.credential}"},
            )
            if r.status_code != 204:
                log.warning("store report refused: %s %s", r.status_code, r.text[:200])
            return r.status_code == 204
        except httpx.HTTPError as exc:
            log.info("store report failed (coordinator unreachable?): %s", exc)
            return False

    def _refresh_firewall(self) -> None:
        import ray

        if self.firewall.enabled:
            try:
                self.firewall.apply(trusted_addresses(ray.nodes(), node_is_trusted))
            except Exception as exc:  # the GCS busy or restarting: keep the rules as they are, try again
                log.info("store firewall not refreshed: %s", exc)

    def _report_loop(self) -> None:
        last = None
        next_at = 0.0
        while not self._stop.is_set():
            if self.state != last or time.monotonic() >= next_at:
                self._refresh_firewall()
                if self._report():
                    last = self.state
                next_at = time.monotonic() + REPORT_EVERY_S
            self._stop.wait(0.5)


def ensure(
    store: str,
    runtime: str = "process",
    selector: dict[str, str] | None = None,
    port: int | None = None,
    data_dir: str | None = None,
) -> Any:
    """Get or create the store's supervisor (a Ray driver must be connected)."""
    import ray

    try:
        return ray.get_actor(actor_name(store), namespace=NAMESPACE)
    except ValueError:
        pass
    cls = ray.remote(StoreSupervisor)
    return cls.options(
        name=actor_name(store),
        namespace=NAMESPACE,
        lifetime="detached",
        max_restarts=-1,
        max_concurrency=8,
        num_cpus=0,
        label_selector=selector or TRUSTED_DATA,
        get_if_exists=True,
    ).remote(store, runtime, port, data_dir)


def endpoint(store: str, timeout: float = 120.0) -> Endpoint:
    import ray
    from ray.exceptions import ActorUnavailableError

    from rma_ray.waiting import GiveUp, wait_until

    actor = ray.get_actor(actor_name(store), namespace=NAMESPACE)
    here = ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + timeout

    class Failed(GiveUp):
        pass

    def ask() -> dict[
        str, Any
    ]:  # a supervisor Ray is restarting (its node died) is "not yet"; anything else fails
        left = max(deadline - time.monotonic(), 1.0)
        try:
            return ray.get(actor.endpoint.remote(left, here), timeout=left + 10)  # type: ignore[no-any-return]
        except ActorUnavailableError:
            raise
        except Exception as exc:
            raise Failed() from exc

    try:
        return Endpoint(
            **wait_until(
                ask,
                timeout=timeout + 10,
                interval=1,
                what=f"the supervisor of {store} (restarting) to give its endpoint",
            )
        )
    except Failed as exc:
        raise exc.__cause__ from None  # type: ignore[misc]
