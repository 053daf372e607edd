"""The supervisor actor: one per store, detached and named `rma-store-<store>` in namespace `rma`, restarted by
Ray forever (`max_restarts=-1`), placed only on trusted data-tier nodes by label selector. It starts (or adopts)
the store, checks readiness with a real query, restarts the store if it dies, and answers `endpoint()` for the
services and `status()` for the registry.

Least exposure: `endpoint()` hands the store's password only to a caller on a trusted node (labelled
`rma.io/trusted=true`, or the Ray head, which is the operator's machine); anyone else gets a refusal. The
caller names its node, so this stops honest misplacement (a replica of a store-reading deployment scheduled
on an untrusted donor), not a hostile member of the same cluster: that boundary is the core/edge split
(SECURITY.md). Where the node runs the overlay, the store's port is firewalled to trusted nodes
(firewall.py).

Pinning: a store stays with its data. The first supervisor that starts a store records where (its donor, the
`rma.io/node` label, and Ray node id) in the volume (`.rma-pin.json`) and in the GCS's key-value store (namespace
`rma`, key `store-pin/<store>`). Ray enforces the pin from then on: `ensure()` creates a supervisor whose store
has a pin with the pinned donor's label in its label selector, so Ray restarts it on that donor only (a label
outlives the donor's Ray node id, which changes when it rejoins), and the registry shows the pending
supervisor as `waiting for <donor>`. A supervisor created before its store had a pin has the plain trusted-data
selector, so Ray may restart it on another donor when the pinned one dies: that incarnation finds the pin naming
another donor and an empty volume (`pin_decision`), does not start an empty store, reports
`waiting for <donor>`, and, once the pinned donor's node is back, has a one-shot detached `Repin` actor kill it
and create the supervisor again with the pinned selector. A store leaves its donor only on purpose:
`rma stores move` (`move_to`: a `Repin` that pins the store on the new donor first; the old volume's pin file
is rewritten to name the new donor, so a supervisor placed there later waits instead of serving the pre-move
data). A labelled pin beats data found on another node (`pin_decision`): that data is stale.

A moved store serves nobody before its data is in: the move's pin carries a marker (`awaiting_restore`), and the
supervisor it creates starts the store empty but hands its endpoint to nobody (`endpoint()` refuses: the
services answer 503 as for a store not ready; `status()` says `awaiting-restore`) until the move has restored
the backup and checked its counts (`serve`), or a plain restore is applied (`rma stores restore`), or the operator
says its data is in (`rma stores serve`: the ways out of a move that failed after its switch). Otherwise the
services, which ask the endpoint again after a connection failure, would find the empty store: reads that find
nothing, and writes a restore of a stopped store then replaces. The supervisor writes the marker into its volume's
pin too (also where its runtime cannot start), so an incarnation Ray restarts mid-move (even with a GCS that
started again empty) still waits; `serve` clears both or neither (it raises, the store still waiting), under a lock
of its own, not behind a supervision step. A starting supervisor whose GCS does not give its pin does not guess from
the volume's copy (it may lack the marker): its process exits and Ray starts another; and recording its own pin
never takes the marker off a GCS pin for this donor.

The GCS starts again empty after `rma down`/`rma up` or a core token rotation, so the operator's machine keeps
the pins too (`<data_dir>/store-pins.json`, rma_ray/storepins.py): `python -m deployments up|down` on the head
copies them from the GCS, and `up` puts them back before `ensure()`, which creates a store pinned on a
labelled donor there whatever the default placement (the head, before a data donor rejoined) says. A move's
marker is kept there too (`rma stores move` writes it, the commands that end the wait take it off): a GCS that
starts again empty after the switch but before the new supervisor's first start (no pin in its volume yet) is
seeded with it, so the store still waits rather than serving empty.

Backups (`backup_begin`, `read_chunk`, `restore_begin`, `write_chunk`, `restore_apply`): the store's own tools,
run here on its node (backup.py), the bytes handed to the caller in chunks (never the whole file in one
message); the store is stopped for the kinds that need it, with supervision held off meanwhile. Every store
under both runtimes: under docker, on the bind mount's host side, with what is written there given to the
image's uid."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deployments.stores import backup
from deployments.stores.firewall import StoreFirewall, trusted_addresses, wanted
from deployments.stores.kinds import KINDS, Endpoint, credentials, dir_size
from deployments.stores.runtime import RUNTIMES, StoreError, make_runtime
from rma_ray.settings import Settings
from rma_ray.storepins import AWAITING_RESTORE, moved_pin
from rma_ray.tiers import LABEL_NODE, LABEL_TIER, LABEL_TRUSTED
from rma_ray.waiting import GiveUp, WaitTimeout, wait_until

NAMESPACE = "rma"
# a move's freeze with no word from its CLI for this long (killed, its connection lost) is undone: writes come
# back where the store is, rather than never (a chunk read, each few seconds of a download, renews it)
FREEZE_LEASE_S = 300
REPORT_EVERY_S = 10.0  # the coordinator shows a store as `unknown` after three missed reports
# how long a starting supervisor asks a GCS that does not answer for its store's pin before it gives up (and its
# process exits, for Ray to start another): guessing from the volume's copy could serve a moved store empty
PIN_READ_S = 10.0
# `serve` writes the GCS's pin without the move's marker, tried again for this long, else it refuses
PIN_WRITE_S = 3.0
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


PIN_FILE = ".rma-pin.json"


def pin_key(store: str) -> bytes:
    return f"store-pin/{store}".encode()


def volume_has_data(kind: str, volume: Path) -> bool:
    """Whether this volume holds the store's data already (a pin file, or the kind's own files)."""
    marks = {
        "postgres": "pgdata/PG_VERSION",
        "redis": "appendonlydir",
        "chroma": "chroma",
        "graph": "arcadedb",
    }
    return (volume / PIN_FILE).exists() or (volume / marks.get(kind, PIN_FILE)).exists()


def pin_decision(pin: dict[str, Any] | None, donor: str, has_data: bool) -> str | None:
    """Whether a supervisor starting on `donor` may start its store: None (yes), or the donor it must wait for
    (its store is pinned there and this node has none of its data: starting here would start it empty).

    Local data counts only for an unlabelled pin (a Ray node id, which changes when the node rejoins): a
    labelled pin names the donor for good, and data here is then stale (an earlier placement or a move)."""
    if not pin or not pin.get("donor") or pin["donor"] == donor or (has_data and not pin.get("labelled")):
        return None
    return str(pin["donor"])


def awaits_restore(pin: dict[str, Any] | None, volume_pin: dict[str, Any] | None, donor: str) -> bool:
    """Whether a supervisor starting its store on `donor` holds its endpoint back for a move's restore: the
    store's pin (`pin`, the GCS's or else the volume's) names this donor, and it or the volume's own pin here
    still carries the move's marker (the volume's outlives a GCS that started again empty; the operator's
    copy, which seeds such a GCS, keeps the marker too until a command that ends the wait takes it off)."""
    if not pin or pin.get("donor") != donor:
        return False
    return bool(pin.get(AWAITING_RESTORE)) or bool(
        volume_pin and volume_pin.get("donor") == donor and volume_pin.get(AWAITING_RESTORE)
    )


def seed_pin(gcs_pin: dict[str, Any] | None, kept: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pin the GCS should hold before `ensure()`: its own, else the one kept on the operator's machine
    (a GCS that started again empty after `rma down`/`rma up` or a token rotation)."""
    return gcs_pin if gcs_pin else kept


def placement_selector(selector: dict[str, str], pin: dict[str, Any] | None) -> dict[str, str]:
    """Where `ensure()` creates a supervisor: a store pinned on a labelled donor goes there whatever the
    default placement (the head, before any data donor rejoined) says; a store pinned on the head stays
    there."""
    if pin and pin.get("labelled") and pin.get("donor") and pin["donor"] != "head":
        return {**TRUSTED_DATA, LABEL_NODE: str(pin["donor"])}
    if pin and pin.get("donor") == "head":
        return {LABEL_TIER: "head"}
    return pinned_selector(selector, pin)


def pinned_selector(selector: dict[str, str], pin: dict[str, Any] | None) -> dict[str, str]:
    """The label selector that keeps a supervisor on its store's donor (a pin on a donor with a `rma.io/node`
    label; the head is one node already)."""
    if pin and pin.get("labelled") and selector.get(LABEL_TIER) != "head":
        return {**selector, LABEL_NODE: str(pin["donor"])}
    return dict(selector)


def read_pin(store: str) -> dict[str, Any] | None:
    """The store's pin from the GCS (None: never placed, or a GCS that started again empty)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(pin_key(store), namespace=NAMESPACE)
    return json.loads(raw) if raw else None


def args_key(store: str) -> bytes:
    return f"store-args/{store}".encode()


def check_move_target(donor: str) -> None:
    """A move's target must be a trusted data donor that is online; else the one line that says so."""
    import ray

    node = next(
        (n for n in ray.nodes() if n.get("Alive") and (n.get("Labels") or {}).get(LABEL_NODE) == donor),
        None,
    )
    labels = (node or {}).get("Labels") or {}
    if node is None or any(labels.get(k) != v for k, v in TRUSTED_DATA.items()):
        raise StoreError(
            f"{donor} is not a trusted data donor that is online (rma.io/node={donor}, "
            f"rma.io/tier=data, rma.io/trusted=true): pick one from `rma donors list --tier data`"
        )


def move_unplaced(store: str, to: str) -> str | None:
    """`move_to` for a supervisor Ray cannot place (pinned on a donor that is gone, so it cannot answer):
    pin the store on `to`, end the pending supervisor, and create one there with the arguments the last
    placed incarnation recorded (`store-args/<store>`), which starts an empty store there. Returns None, or
    the one line of a refusal (`rma stores move --from-backup` reaches it by the `rma.stores` entry point)."""
    import ray
    from ray.experimental import internal_kv

    try:
        check_move_target(to)
    except StoreError as exc:
        return str(exc)
    raw = internal_kv._internal_kv_get(args_key(store), namespace=NAMESPACE)
    if not raw:
        return (
            f"the pool has no record of how {store}'s supervisor was created (its runtime and port): "
            f"run `rma up` once so it is recorded, then move it again; nothing moved"
        )
    args = json.loads(raw)
    before = read_pin(store)
    _put_pin(store, moved_pin(store, to))
    try:
        try:
            old = ray.get_actor(actor_name(store), namespace=NAMESPACE)
        except ValueError:
            old = None
        if old is not None:
            try:  # placed meanwhile (its donor back): let it stop its store cleanly first
                ray.get(old.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - not placed, or not answering: ended below all the same
                pass
            ray.kill(old, no_restart=True)

        def gone() -> bool:
            try:
                ray.get_actor(actor_name(store), namespace=NAMESPACE)
                return False
            except ValueError:
                return True

        wait_until(gone, timeout=60, interval=0.5, what=f"the unplaced supervisor of {store} to end")
        _put_pin(
            store, moved_pin(store, to)
        )  # again: an incarnation placed meanwhile may have written its own
        ensure(
            store, str(args.get("runtime") or "process"), port=args.get("port"), data_dir=args.get("data_dir")
        )
    except Exception as exc:  # noqa: BLE001 - one line to the CLI; the old pin back where nothing was created
        try:
            ray.get_actor(actor_name(store), namespace=NAMESPACE)
        except ValueError:
            if before is not None:
                _put_pin(store, before)
        return f"{store} could not be moved ({type(exc).__name__}: {exc})"[:500]
    return None


def _put_pin(store: str, pin: dict[str, Any]) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(pin_key(store), json.dumps(pin), overwrite=True, namespace=NAMESPACE)


def donor_alive(donor: str) -> bool:
    import ray

    return any(n.get("Alive") and (n.get("Labels") or {}).get(LABEL_NODE) == donor for n in ray.nodes())


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
        self.volume.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.volume.chmod(
            0o700
        )  # a store's files are its whole dataset: no other user on the donor reads them
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
        self.frozen = False  # a move's backup_begin(freeze=True): writes refused until unfreeze or the switch
        self.switching = False  # move_to began: the freeze is the switch's now, unfreeze refuses
        self.freeze_touched = 0.0  # the move's last call (backup, a chunk read): the freeze's lease
        self._freeze_cancelled = False  # unfreeze came while a freezing backup was still on its way
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.RLock()  # held by each supervision step and for a backup's or restore's stop
        # the move's marker (awaiting_restore) and the pins that carry it: its own lock, so that `serve` never
        # waits behind a supervision step (a `_bring_up` takes up to 120 s)
        self._marker_lock = threading.Lock()
        self._transfers: dict[str, dict[str, Any]] = {}
        self.transfers_dir = root / f".{store}-transfers"
        shutil.rmtree(self.transfers_dir, ignore_errors=True)  # an earlier incarnation's unfinished transfers
        self.store_name, self.port_arg, self.data_dir_arg = store, port, data_dir
        self.donor = self.labels.get(LABEL_NODE) or (
            "head"
            if HEAD_RESOURCE in ((_ray_node(self.node_id) or {}).get("Resources") or {})
            else self.node_id
        )
        try:
            self.pin = self._pin()
        except StoreError as exc:
            # raised, it would end this actor for good (Ray restarts one whose process dies, not one whose
            # constructor raised): the process exits, and the incarnation Ray starts asks the GCS again
            log.error("%s: %s; this incarnation exits for Ray to start another", store, exc)
            os._exit(1)
        self.waiting_for = pin_decision(self.pin, self.donor, volume_has_data(store, self.volume))
        # created by a move: the store starts here, but serves nobody until its data is restored
        self.awaiting_restore = awaits_restore(self.pin, self._volume_pin(), self.donor)
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        if self.waiting_for is not None:
            self.state = "waiting"
            self.error = (
                f"waiting for {self.waiting_for}: this store's data is on that donor and this node has none; "
                f"it starts there when the donor is back"
            )
            threading.Thread(target=self._wait_for_donor, daemon=True).start()
        else:
            if self.runtime is not None or (self.pin or {}).get("donor") == self.donor:
                # the pinned one records its pin even when its runtime cannot start here (no docker): a move's
                # marker then reaches its volume, and an incarnation Ray restarts still waits for the restore
                self._record_pin()
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
        if self.frozen and self.kind.name in ("postgres", "redis"):
            backup.freeze_writes(self.kind.name, self._endpoint())  # it restarted mid-move: still no writes
        elif self.kind.name in ("postgres", "redis"):
            self._thaw_left_freeze()
        self.ready_s = time.monotonic() - t0
        self.state, self.error = "ready", None
        self._ready.set()

    def _thaw_left_freeze(self) -> None:
        """A freeze no live move owns: a PostgreSQL volume left read-only by a move (ALTER SYSTEM), started
        again here later (the store moved back), or a Redis adopted from an incarnation that froze it."""
        if backup.is_frozen(self.kind.name, self._endpoint()):
            backup.thaw_writes(self.kind.name, self._endpoint())
            log.info("%s was left refusing writes by a move: it takes writes again", self.kind.name)

    def _supervise(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            pause = 1.0
            with self._lock:
                if self._stop.is_set():
                    return
                if self.frozen and not self.switching and self._freeze_lapsed():
                    log.warning(
                        "%s: the move that froze it has not been heard of for %d s: it takes writes again",
                        self.kind.name,
                        FREEZE_LEASE_S,
                    )
                    try:
                        self._unfreeze()
                    except Exception as exc:  # tried again on the next turn
                        log.warning("%s: its freeze could not be undone: %s", self.kind.name, exc)
                elif self.state == "frozen":
                    pass  # stopped for a move on purpose: unfreeze() or the switch ends it
                elif self.state != "ready":
                    try:
                        self._bring_up()
                        delay = 1.0
                    except Exception as exc:  # StoreError says what to fix; anything else: its type and text
                        self.state = "failed"
                        self.error = (
                            str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
                        )
                        self.runtime.stop(5)
                        pause, delay = delay, min(60.0, delay * 2)
                elif not self.runtime.alive():
                    self.state, self.error = "restarting", f"{self.kind.name} {self.runtime.name} exited"
                    self._ready.clear()
                    self.restarts += 1
                    pause = 0.0
            self._stop.wait(pause)

    # -- pinning -------------------------------------------------------------------------------------------

    def _pin(self) -> dict[str, Any] | None:
        """The store's pin: the GCS's copy, else the volume's (a GCS that started again empty). A GCS that does
        not answer is asked again for `PIN_READ_S`, then this raises: the volume's copy may lack a move's
        marker that only the GCS's holds (the move's pin, written before this supervisor existed), and a
        guess would serve the moved store empty."""
        try:
            (pin,) = wait_until(
                lambda: (read_pin(self.store_name),),  # a tuple: "no pin" (None) ends the wait too
                timeout=PIN_READ_S,
                interval=1,
                what=f"{self.store_name}'s pin from the GCS",
            )
        except WaitTimeout as exc:
            raise StoreError(str(exc)) from None
        return pin if pin is not None else self._volume_pin()

    def _volume_pin(self) -> dict[str, Any] | None:
        try:
            pin = json.loads((self.volume / PIN_FILE).read_text())
        except (OSError, ValueError):
            return None
        return pin if isinstance(pin, dict) else None

    def _pin_here(self, awaiting: bool) -> dict[str, Any]:
        """This supervisor's pin: its donor and node, with the move's marker if `awaiting`."""
        pin = {
            "store": self.store_name,
            "donor": self.donor,
            "labelled": LABEL_NODE in self.labels,
            "node_id": self.node_id,
            "node_ip": self.host,
            "since": (self.pin or {}).get("since") if (self.pin or {}).get("donor") == self.donor else None,
        }
        if awaiting:
            pin[AWAITING_RESTORE] = True
        pin["since"] = pin["since"] or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return pin

    def _record_pin(self) -> None:
        """Pin the store here, in the volume and the GCS (at start). A GCS pin that holds a move's marker for
        this donor keeps it (a move that pinned it here after this supervisor read its pin): only `_serve`
        takes the marker away."""
        from ray.experimental import internal_kv

        with self._marker_lock:
            gcs = True
            if not self.awaiting_restore:
                try:
                    self.awaiting_restore = awaits_restore(read_pin(self.store_name), None, self.donor)
                except Exception as exc:  # the GCS busy: its pin is not overwritten unseen
                    log.warning("store pin not read from the GCS, so not written there: %s", exc)
                    gcs = False
            pin = self._pin_here(self.awaiting_restore)
            self._write_volume_pin(pin)
            if gcs:
                try:
                    internal_kv._internal_kv_put(
                        pin_key(self.store_name), json.dumps(pin), overwrite=True, namespace=NAMESPACE
                    )
                except Exception as exc:  # the volume keeps it; the next supervisor writes it again
                    log.warning("store pin not written to the GCS: %s", exc)
            self.pin = pin

    def _write_volume_pin(self, pin: dict[str, Any]) -> None:
        tmp = self.volume / (PIN_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(pin))
        os.replace(tmp, self.volume / PIN_FILE)

    def _wait_for_donor(self) -> None:
        """Waiting: once the pinned donor's node is back, have a `Repin` actor put this supervisor there."""

        while not self._stop.wait(2.0):
            try:
                if not donor_alive(str(self.waiting_for)):
                    continue
                self._repin()
                return
            except Exception as exc:  # the GCS busy: try again
                log.info("repin not started: %s", exc)

    # -- the actor's API ---------------------------------------------------------------------------------

    def _check_caller(self, node_id: str | None, what: str, fix: str) -> None:
        """Refuse a caller that is not on a trusted node (labelled, or the head): the store's credentials and
        its whole data (a backup, a restore, its counts) go to and come from trusted nodes only."""
        if not node_id or not node_is_trusted(_ray_node(node_id)):
            log.warning(
                "refused %s's %s to a caller on node %s (not a trusted node)",
                self.kind.name,
                what,
                (node_id or "?")[:12],
            )
            raise StoreError(
                f"{self.kind.name}'s {what} go only to trusted nodes (rma.io/trusted=true "
                f"or the head); node {(node_id or '?')[:12]} is not one: {fix}"
            )

    def endpoint(self, timeout: float = 120.0, node_id: str | None = None) -> dict[str, Any]:
        """Host, port and credentials, once the store answers queries (raises with the reason otherwise), to a
        caller on a trusted node only."""
        self._check_caller(node_id, "credentials", "place this deployment on trusted nodes")
        if self.awaiting_restore:  # at once: callers held for the restore's minutes would take every thread
            raise StoreError(self._awaiting_why())
        if not self._ready.wait(timeout):
            raise StoreError(self.error or f"{self.kind.name} is not ready yet")
        return self._endpoint().__dict__.copy()

    def _awaiting_why(self) -> str:
        return (
            f"{self.kind.name} is being moved to {self.donor}: waiting for its data (the move restores it; "
            f"after a move that failed, `rma stores restore {self.kind.name} BACKUP` if its data is not in, "
            f"`rma stores serve {self.kind.name}` if it is)"
        )

    def _shown_state(self) -> str:
        """The state the registry shows: a ready store a move has not restored yet is `awaiting-restore`."""
        return "awaiting-restore" if self.awaiting_restore and self.state == "ready" else self.state

    def serve(self, node_id: str | None = None) -> dict[str, Any]:
        """A moved store's data is in (the move restored it and checked its counts, or the operator says so:
        `rma stores serve`): its endpoint goes to the services from now on, also from an incarnation Ray
        restarts (the pins lose the move's marker). Nothing for a store that awaits no restore."""
        self._check_caller(
            node_id, "restores", "run this from the operator's machine (the head) or a trusted node"
        )
        self._serve()
        return self.status()

    def _serve(self) -> None:
        """Take the move's marker off both pins, then serve. Strict: a pin left with it would hold an
        incarnation Ray restarts back, one left without it would let it serve whatever it holds; so both are
        written (the GCS's tried again for `PIN_WRITE_S`) or this raises and the store stays awaiting."""
        from ray.experimental import internal_kv

        with self._marker_lock:
            if not self.awaiting_restore:
                return
            pin = self._pin_here(awaiting=False)

            def put() -> bool:
                internal_kv._internal_kv_put(
                    pin_key(self.store_name), json.dumps(pin), overwrite=True, namespace=NAMESPACE
                )
                return True

            try:
                self._write_volume_pin(pin)
                wait_until(put, timeout=PIN_WRITE_S, interval=0.5, what=f"{self.store_name}'s pin in the GCS")
            except Exception as exc:
                # the volume's pin gets its marker back: an incarnation Ray restarts waits again
                with contextlib.suppress(OSError):
                    self._write_volume_pin(self._pin_here(awaiting=True))
                cause = exc.last if isinstance(exc, WaitTimeout) else exc  # the GCS's own error, tried again
                raise StoreError(
                    f"{self.kind.name}'s pin could not be written ({type(cause).__name__}: {cause}); it serves "
                    f"nobody yet: try `rma stores serve {self.kind.name}` again"
                ) from exc
            self.pin, self.awaiting_restore = pin, False
        log.info("%s serves: its data was restored on %s", self.kind.name, self.donor)

    def status(self) -> dict[str, Any]:
        shown = self._shown_state()
        return {
            "name": self.kind.name,
            "runtime": self.runtime_name,
            "node_id": self.node_id,
            "node_ip": self.host,
            "labels": self.labels,
            "status": shown,
            "error": self._awaiting_why() if shown == "awaiting-restore" else self.error,
            "pid": self.runtime.pid if self.runtime else None,
            "port": self.port,
            "size_bytes": dir_size(self.volume),
            "ready_s": self.ready_s,
            "restarts": self.restarts,
            "adopted": self.adopted,
            "supervisor_pid": os.getpid(),
            "firewall": self.firewall.state,
            "donor": self.donor,
            "pinned_to": (self.pin or {}).get("donor"),
            "waiting_for": self.waiting_for,
            "incarnation": self.incarnation,
            "frozen": self.frozen,
            "switching": self.switching,
            "awaiting_restore": self.awaiting_restore,
        }

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self.runtime is not None:
                self.runtime.stop()
        self.firewall.remove()
        self.state = "stopped"
        self._report()

    # -- backups (backup.py: what each kind runs) ------------------------------------------------------------

    def _usable(self) -> None:
        if self.runtime is None or self.waiting_for is not None:
            raise StoreError(f"{self.kind.name} is not running here: {self.error}")
        if self.frozen:
            raise StoreError(
                f"{self.kind.name} is frozen for a move (writes refused): back it up or restore it after the move"
            )
        if self.runtime_name not in ("process", "docker"):
            raise StoreError(
                f"backups of stores under the {self.runtime_name} runtime are not supported: "
                f"run the {self.kind.name} store with runtime 'process' or 'docker'"
            )

    def _files(self) -> tuple[Path, int | None]:
        """Where the store's files are on this node, and whose what a restore writes there must be: the volume
        (left as made) under `process`; the bind mount's host side and the image's uid under `docker`."""
        if self.runtime_name == "docker":
            return Path(self.runtime.data), int(self.runtime.spec.uid)
        return self.volume, None

    def _version(self) -> str:
        return backup.store_version(self.kind.name, self._endpoint(), self.volume, self.runtime)

    @contextmanager
    def _stopped(self, state: str, keep_stopped: bool = False) -> Iterator[None]:
        """The store stopped cleanly, supervision held off, then started again and answering queries; with
        `keep_stopped` (a move's backup) it stays stopped, `frozen`, if the body succeeded (`unfreeze`)."""
        with self._lock:
            self.state, self.error = state, None
            self._ready.clear()
            self.runtime.stop()
            ok = False
            try:
                yield
                ok = True
            finally:
                if ok and keep_stopped:
                    self.state, self.error = "frozen", "stopped for a move: its data is being moved"
                    self.frozen, self.freeze_touched = True, time.monotonic()
                else:
                    self.state = "starting"
                    self._bring_up()  # raises if it does not come back; the supervision loop keeps trying

    def _freeze_lapsed(self) -> bool:
        return time.monotonic() - self.freeze_touched > FREEZE_LEASE_S

    def unfreeze(self) -> dict[str, Any]:
        """Take writes again after a move that stopped before its switch (`backup_begin(freeze=True)`); refused
        once the switch has begun (the store is then the new donor's)."""
        with self._lock:
            if self.switching:
                raise StoreError(
                    f"{self.kind.name} is switching to its new donor: its writes come back there"
                )
            if not self.frozen:
                self._freeze_cancelled = True  # a freezing backup still on its way gives up
                return self.status()
            self._unfreeze()
        log.info("%s takes writes again (the move did not switch)", self.kind.name)
        return self.status()

    def _unfreeze(self) -> None:
        if self.state == "frozen":
            self.frozen = False
            self.state = "starting"
            self._bring_up()
        else:
            backup.thaw_writes(self.kind.name, self._endpoint())  # raises: still frozen, unfreeze again
            self.frozen, self.error = False, None

    def _new_transfer(self, **fields: Any) -> tuple[str, Path]:
        tid = uuid.uuid4().hex
        self.transfers_dir.mkdir(mode=0o700, exist_ok=True)
        path = self.transfers_dir / tid
        self._transfers[tid] = {"path": path, **fields}
        return tid, path

    def _transfer(self, tid: str) -> dict[str, Any]:
        try:
            return self._transfers[tid]
        except KeyError:
            raise StoreError(
                f"no transfer {tid[:8]} on this supervisor (it restarted?): start again"
            ) from None

    def backup_begin(self, node_id: str | None = None, freeze: bool = False) -> dict[str, Any]:
        """Take a backup into a file on this node; returns its manifest and a transfer id for `read_chunk`
        (to a caller on a trusted node only). `freeze` (a move): writes are refused from before the backup
        on (backup.freeze_writes; a store snapshotted stopped stays stopped) until `unfreeze` or the move's
        switch stops this supervisor, so that nothing is acknowledged after the backup and lost."""
        self._check_caller(
            node_id, "backups", "run this from the operator's machine (the head) or a trusted node"
        )
        self._usable()
        if self.awaiting_restore:  # what it holds is not the store's data (the move's backup is)
            raise StoreError(
                f"{self.kind.name} on {self.donor} awaits a move's restore: it holds no data of its own to back up "
                f"yet; the move's backup is in the data dir's backups/ (`rma stores restore {self.kind.name} "
                f"BACKUP` puts it in, `rma stores serve {self.kind.name}` serves what it holds)"
            )
        if freeze:
            with self._lock:
                self._freeze_cancelled = False
        self._ready.wait(120)
        tid, path = self._new_transfer()
        ep = self._endpoint()
        version = self._version()
        root, _ = self._files()
        try:
            held = backup.counts(self.kind.name, ep)
        except Exception as exc:  # informative in a plain backup; a move checks them and says so
            log.info("counts of %s not taken: %s", self.kind.name, exc)
            held = None
        try:
            if self.kind.name in backup.STOP_TO_BACKUP:
                if freeze:
                    self._freeze_check()
                with self._stopped("backing-up", keep_stopped=freeze):
                    backup.snapshot_stopped(self.kind.name, root, path)
            else:
                if freeze:
                    with self._lock:
                        self._freeze_check()
                        # frozen before the freeze is applied: one that fails half-way (ALTER SYSTEM done, the
                        # sessions not ended) is undone below like a whole one; and no lease runs out while the
                        # dump is taken (a large store dumps for minutes; the chunk reads renew it after)
                        self.frozen, self.freeze_touched = True, float("inf")
                        self.error = "writes refused: its data is being moved"
                        backup.freeze_writes(self.kind.name, ep)
                    held = backup.counts(self.kind.name, ep)  # what the frozen store holds: all there is
                backup.dump_online(self.kind.name, ep, root, path)
                if freeze:
                    self.freeze_touched = time.monotonic()
        except BaseException:
            self.transfer_end(tid)
            if freeze:
                try:
                    self.unfreeze()
                except Exception as exc:  # the lease still undoes it; the backup's own error is what to say
                    log.warning(
                        "%s: its freeze was not undone after a failed backup: %s", self.kind.name, exc
                    )
            raise
        manifest = {**backup.manifest(self.kind.name, version, path, self.runtime_name), "counts": held}
        log.info("backup of %s taken: %d bytes", self.kind.name, manifest["size_bytes"])
        return {"transfer": tid, "manifest": manifest}

    def _freeze_check(self) -> None:
        if self._freeze_cancelled:
            self._freeze_cancelled = False
            raise StoreError(
                f"the move of {self.kind.name} was given up before its backup: nothing was moved"
            )

    def read_chunk(self, tid: str, offset: int, size: int = backup.CHUNK) -> bytes:
        if self.frozen:
            self.freeze_touched = time.monotonic()  # the move is alive: its freeze holds
        with open(self._transfer(tid)["path"], "rb") as f:
            f.seek(offset)
            return f.read(min(size, backup.CHUNK))

    def transfer_end(self, tid: str) -> None:
        t = self._transfers.pop(tid, None)
        if t is not None:
            Path(t["path"]).unlink(missing_ok=True)

    def restore_begin(self, manifest: dict[str, Any], node_id: str | None = None) -> str:
        """Get ready to receive a backup (`write_chunk`, then `restore_apply`), from a trusted node only."""
        self._check_caller(
            node_id, "restores", "run this from the operator's machine (the head) or a trusted node"
        )
        self._usable()
        if (
            manifest.get("store") != self.kind.name
            or manifest.get("format") != backup.FORMATS[self.kind.name]
        ):
            raise StoreError(
                f"this backup is of {manifest.get('store')!r} ({manifest.get('format')!r}), "
                f"not of {self.kind.name}: restore it into its own store"
            )
        if not self._ready.wait(120):  # its version is what the backup is checked against
            raise StoreError(self.error or f"{self.kind.name} is not ready yet: restore once it runs")
        backup.check_restorable(self.kind.name, manifest.get("store_version"), self._version())
        tid, path = self._new_transfer(manifest=manifest)
        path.touch(mode=0o600)
        return tid

    def write_chunk(self, tid: str, data: bytes) -> int:
        path = self._transfer(tid)["path"]
        with open(path, "ab") as f:
            f.write(data)
        return int(path.stat().st_size)

    def restore_apply(self, tid: str, hold: bool = False) -> dict[str, Any]:
        """Check the received file against its manifest, then put it in place of the store's data. A store a
        move created serves from then on, unless `hold` (the move, which checks its counts first: `serve`)."""
        t = self._transfer(tid)
        try:
            path, manifest = t["path"], t["manifest"]
            if backup.sha256_of(path) != manifest.get("sha256"):
                raise StoreError(
                    "the backup arrived damaged (its sha256 differs from the manifest's): try again"
                )
            if self.kind.name in backup.STOP_TO_RESTORE:
                self._restore_stopped(path)
            else:
                self._ready.wait(120)
                backup.restore_online(self.kind.name, self._endpoint(), path)
        finally:
            self.transfer_end(tid)
        log.info("%s restored from a backup of %s", self.kind.name, manifest.get("created_at"))
        if not hold:
            self._serve()
        return self.status()

    def _restore_stopped(self, path: Path) -> None:
        """Stop the store, put the backup in place, start it on the new data; if it does not start, its previous
        data is put back and started again (a restore never leaves the store with neither)."""
        root, uid = self._files()
        swapped: backup.Swapped | None = None
        try:
            with self._stopped("restoring"):
                swapped = backup.restore_stopped(self.kind.name, root, path, uid)
        except BaseException as exc:
            if swapped is None:  # nothing was replaced: _stopped brought the store back on its own data
                raise
            log.error(
                "%s did not start on the restored data (%s): putting its previous data back",
                self.kind.name,
                exc,
            )
            with self._lock:
                self._ready.clear()
                self.runtime.stop()
                swapped.rollback()
                self.state = "starting"
                self._bring_up()
            raise StoreError(
                f"{self.kind.name} did not start on the restored data ({exc}); its previous data was put back"
            ) from exc
        swapped.commit()

    def counts(self, node_id: str | None = None) -> dict[str, int]:
        """Rows, keys or records the store holds (backup.counts), to a caller on a trusted node only."""
        self._check_caller(
            node_id, "counts", "run this from the operator's machine (the head) or a trusted node"
        )
        self._usable()
        if not self._ready.wait(120):
            raise StoreError(self.error or f"{self.kind.name} is not ready yet")
        return backup.counts(self.kind.name, self._endpoint())

    def check_target(self, donor: str) -> None:
        """What move_to checks of its target, asked before a move freezes anything (a mistyped donor)."""
        check_move_target(donor)
        if donor == self.donor and self.waiting_for is None:  # a waiting one runs no store here
            raise StoreError(f"{self.kind.name} already runs on {donor}")

    def move_to(self, donor: str, frozen_only: bool = False) -> None:
        """Hand this store's place to a new supervisor pinned on `donor` (a trusted data donor that is online):
        a detached `Repin` stops this one (the store flushes; the volume stays here) and creates the new one,
        which starts an empty store there for `rma stores move` to restore into. `frozen_only` (a move that
        froze it): refused if the freeze was undone meanwhile (the move was given up; writes were taken)."""
        with self._lock:
            if frozen_only and not self.frozen:
                raise StoreError(
                    f"{self.kind.name} takes writes again (the move was given up, or its freeze lapsed): "
                    f"move it again"
                )
            self.check_target(donor)
            self.switching = True
        try:
            # this volume keeps the pre-move data: its pin names the new donor, so a supervisor placed here
            # later waits for that donor instead of serving stale data (pin_decision)
            self._write_volume_pin(moved_pin(self.store_name, donor))
            # and the GCS pin, before any Repin runs: a waiting supervisor's own return-to-its-donor run may
            # reach the one-shot Repin first (its donor back meanwhile); with the pin on `donor` either run
            # creates the new supervisor there
            try:
                _put_pin(self.store_name, moved_pin(self.store_name, donor))
            except Exception as exc:  # noqa: BLE001 - the GCS busy: the Repin's own run still pins it there
                log.warning("the GCS pin of %s not written before its move: %s", self.store_name, exc)
            self._repin(donor)
        except BaseException:
            # no Repin: the store stays here, and so do its pins (else it would wait for `donor` later)
            if self.pin is not None:
                with contextlib.suppress(Exception):
                    self._write_volume_pin(self.pin)
                for attempt in range(5):  # the GCS busy: a pin left on `donor` would move it there empty
                    try:
                        _put_pin(self.store_name, self.pin)
                        break
                    except Exception as exc:  # noqa: BLE001
                        log.warning(
                            "the GCS pin of %s not put back (try %d): %s", self.store_name, attempt, exc
                        )
                        time.sleep(1.0)
            self.switching = False
            raise

    def _repin(self, *donor: str) -> None:
        """The one-shot `Repin` actor that replaces this supervisor with one on the pinned donor (or `donor`)."""
        import ray

        ray.remote(Repin).options(
            name=f"{actor_name(self.store_name)}-repin",
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            get_if_exists=True,
        ).remote().run.remote(
            self.store_name, self.runtime_name, self.port_arg, self.data_dir_arg, self.incarnation, *donor
        )

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
            shown = self._shown_state()
            if shown != last or time.monotonic() >= next_at:
                self._refresh_firewall()
                if self._report():
                    last = shown
                next_at = time.monotonic() + REPORT_EVERY_S
            self._stop.wait(0.5)


class Repin:
    """One-shot and detached: replaces a supervisor by one that Ray places on the store's pinned donor (a
    waiting one, see the module docstring), or on a new donor (`to`: a move). Holds no secret; outlives the
    supervisor it ends."""

    def run(
        self,
        store: str,
        runtime: str,
        port: int | None,
        data_dir: str | None,
        incarnation: str,
        to: str | None = None,
    ) -> None:
        import ray
        from ray.experimental import internal_kv

        try:
            old = ray.get_actor(actor_name(store), namespace=NAMESPACE)
            if ray.get(old.status.remote(), timeout=30).get("incarnation") == incarnation:
                if to is not None:  # the new supervisor's pin: it starts its store there (pin_decision)
                    internal_kv._internal_kv_put(
                        pin_key(store), json.dumps(moved_pin(store, to)), overwrite=True, namespace=NAMESPACE
                    )
                try:
                    ray.get(old.stop.remote(), timeout=120)  # the store flushes and exits; its volume stays
                except Exception as exc:  # a waiting supervisor has nothing to stop; a dead one cannot
                    log.info("old supervisor of %s not stopped cleanly: %s", store, exc)
                ray.kill(old, no_restart=True)

                def gone() -> bool:
                    try:
                        ray.get_actor(actor_name(store), namespace=NAMESPACE)
                        return False
                    except ValueError:
                        return True

                wait_until(gone, timeout=60, interval=0.5, what=f"the waiting supervisor of {store} to end")
                # a transient failure (the GCS busy) must not leave the store with no supervisor at all
                wait_until(
                    lambda: ensure(store, runtime, port=port, data_dir=data_dir),
                    timeout=300,
                    interval=2,
                    what=f"a new supervisor of {store}",
                )
        finally:
            ray.actor.exit_actor()


def ensure(
    store: str,
    runtime: str = "process",
    selector: dict[str, str] | None = None,
    port: int | None = None,
    data_dir: str | None = None,
) -> Any:
    """Get or create the store's supervisor (a Ray driver must be connected): on its pinned donor when the
    store has a pin, else wherever `selector` allows."""
    import ray
    from ray.experimental import internal_kv

    args = {"runtime": runtime, "port": port, "data_dir": data_dir}
    try:
        actor = ray.get_actor(actor_name(store), namespace=NAMESPACE)
    except ValueError:
        actor = None
    if actor is not None:
        with contextlib.suppress(Exception):  # a pool from before the record (`rma up` after an upgrade)
            internal_kv._internal_kv_put(
                args_key(store), json.dumps(args), overwrite=False, namespace=NAMESPACE
            )
        return actor
    try:
        pin = read_pin(store)
    except Exception as exc:  # the GCS busy: the supervisor itself still refuses to start empty
        log.info("store pin not read: %s", exc)
        pin = None
    try:  # for `move_unplaced`: a supervisor Ray cannot place cannot say how it was created
        internal_kv._internal_kv_put(args_key(store), json.dumps(args), overwrite=True, namespace=NAMESPACE)
    except Exception as exc:  # the GCS busy: move_unplaced then refuses rather than guess
        log.info("store arguments not written to the GCS: %s", exc)
    cls = ray.remote(StoreSupervisor)
    return cls.options(
        name=actor_name(store),
        namespace=NAMESPACE,
        lifetime="detached",
        max_restarts=-1,
        max_concurrency=8,
        num_cpus=0,
        label_selector=placement_selector(selector or TRUSTED_DATA, pin),
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
