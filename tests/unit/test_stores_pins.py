"""Store pinning that outlives the GCS, a move's hand-over, who may take a store's data, a backup's file modes
and a redis BGSAVE that has to wait: without Ray (a stand-in `ray` module where the code imports one)."""

from __future__ import annotations

import hashlib
import json
import stat
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from deployments.stores import backup, supervisor
from deployments.stores.kinds import KINDS
from deployments.stores.runtime import StoreError
from deployments.stores.supervisor import (
    PIN_FILE,
    TRUSTED_DATA,
    StoreSupervisor,
    awaits_restore,
    pin_decision,
    placement_selector,
    seed_pin,
    volume_has_data,
)
from rma_ray.cli import app
from rma_ray.cli.common import CliError
from rma_ray.storepins import PINS_FILE, load_pins, moved_pin, save_pins, served

ON_HEAD = {"rma.io/tier": "head"}
pin_key_redis = supervisor.pin_key("redis")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_labelled_pin_wins_over_stale_data_here() -> None:
    labelled = {"donor": "w-a", "labelled": True}
    assert pin_decision(labelled, "w-b", has_data=True) == "w-a"  # old data from an earlier placement: wait
    assert pin_decision(labelled, "w-a", has_data=False) is None
    assert pin_decision({"donor": "0a1b", "labelled": False}, "w-b", has_data=True) is None  # node id changed


def test_kept_pins_outlive_the_gcs_and_place_the_supervisor_on_its_donor(tmp_path: Path) -> None:
    path = tmp_path / "pool" / PINS_FILE
    pin = {"store": "postgres", "donor": "w-a", "labelled": True, "node_id": "n1", "since": "2026"}
    save_pins(path, {"postgres": pin, "redis": {"store": "redis", "donor": "head", "labelled": False}})
    save_pins(path, {"redis": None})  # merged: postgres stays, redis forgotten
    assert load_pins(path) == {"postgres": pin} and mode(path) == 0o600
    # a GCS that started again empty is seeded from the file; a pin the GCS has wins
    assert seed_pin(None, load_pins(path)["postgres"]) == pin
    assert seed_pin({"donor": "w-b"}, pin) == {"donor": "w-b"}
    # before a data donor rejoined `up` would place on the head: the pinned store waits for its donor
    assert placement_selector(ON_HEAD, pin) == {**TRUSTED_DATA, "rma.io/node": "w-a"}
    assert placement_selector(TRUSTED_DATA, pin) == {**TRUSTED_DATA, "rma.io/node": "w-a"}
    assert placement_selector(TRUSTED_DATA, {"donor": "head", "labelled": False}) == ON_HEAD
    assert placement_selector(ON_HEAD, None) == ON_HEAD
    (tmp_path / "bad.json").write_text("{not json")
    assert load_pins(tmp_path / "bad.json") == {} and load_pins(tmp_path / "none.json") == {}


class FakeRay(types.ModuleType):
    """What supervisor.py and rma_ray/cli/stores.py use of `ray`: values are ready at once (`get` returns
    them, or raises the error a call was given)."""

    class exceptions:  # noqa: N801 - as ray spells it
        class RayTaskError(Exception):
            def __init__(self, cause: Exception) -> None:
                super().__init__(str(cause))
                self.cause = cause

        class GetTimeoutError(Exception):
            pass

        class RayActorError(Exception):
            pass

    def __init__(self, nodes: list[dict[str, Any]] | None = None, actor: Any = None) -> None:
        super().__init__("ray")
        self._nodes, self.actor = nodes or [], actor
        self.started: list[tuple[Any, ...]] = []

    def is_initialized(self) -> bool:
        return True

    def nodes(self) -> list[dict[str, Any]]:
        return self._nodes

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        if isinstance(ref, Exception):
            raise ref
        return ref

    def get_actor(self, name: str, namespace: str | None = None) -> Any:
        return self.actor

    def get_runtime_context(self) -> Any:
        return types.SimpleNamespace(get_node_id=lambda: "node-here")

    def remote(self, cls: Any) -> Any:
        started = self.started

        class Handle:
            def options(self, **kw: Any) -> Any:
                return self

            def remote(self) -> Any:
                return types.SimpleNamespace(run=types.SimpleNamespace(remote=lambda *a: started.append(a)))

        return Handle()


def bare_supervisor(tmp_path: Path, store: str = "redis", donor: str = "w-a") -> StoreSupervisor:
    sup = StoreSupervisor.__new__(StoreSupervisor)
    sup.kind, sup.store_name, sup.donor = KINDS[store], store, donor
    sup.volume = tmp_path / store
    sup.volume.mkdir(parents=True, exist_ok=True)
    sup.runtime, sup.runtime_name, sup.waiting_for, sup.error = None, "process", None, "stopped"
    sup.port_arg, sup.data_dir_arg, sup.incarnation = None, None, "inc-1"
    sup._lock, sup.frozen, sup.switching, sup.pin = threading.RLock(), False, False, None
    sup.awaiting_restore, sup._marker_lock = False, threading.Lock()
    return sup


def test_move_leaves_the_old_volume_waiting_for_the_new_donor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay([{"Alive": True, "Labels": {**TRUSTED_DATA, "rma.io/node": "w-b"}}])
    monkeypatch.setitem(sys.modules, "ray", fake)
    sup = bare_supervisor(tmp_path, "postgres", donor="head")
    (sup.volume / "pgdata").mkdir()
    (sup.volume / "pgdata" / "PG_VERSION").write_text("17\n")  # the pre-move data stays here
    sup._write_volume_pin({"store": "postgres", "donor": "head", "labelled": False})
    sup.move_to("w-b")
    assert fake.started and fake.started[0][-1] == "w-b"  # the Repin that creates the new supervisor
    pin = json.loads((sup.volume / PIN_FILE).read_text())
    assert pin == moved_pin("postgres", "w-b") and mode(sup.volume / PIN_FILE) == 0o600
    # a supervisor that lands on the old volume later (the GCS empty: it reads this pin) waits, never serves
    assert pin_decision(pin, "head", volume_has_data("postgres", sup.volume)) == "w-b"


def test_store_data_goes_to_trusted_callers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = {
        "donor": {"Alive": True, "Labels": {"rma.io/tier": "data"}, "Resources": {}},
        "trusted": {"Alive": True, "Labels": {"rma.io/trusted": "true"}, "Resources": {}},
    }
    monkeypatch.setattr(supervisor, "_ray_node", nodes.get)
    sup = bare_supervisor(tmp_path)
    for call in (
        lambda n: sup.backup_begin(n),
        lambda n: sup.restore_begin({"store": "redis"}, n),
        lambda n: sup.counts(n),
    ):
        for node in (None, "donor", "gone"):
            with pytest.raises(StoreError, match="go only to trusted nodes"):
                call(node)
        with pytest.raises(StoreError, match="not running here"):  # past the check: the store's own state
            call("trusted")


class FakeSupervisor:
    """A redis supervisor on w-a whose store moves to w-b; restoring into the new one fails."""

    content = b"REDIS0011" + b"k" * 100

    def __init__(self) -> None:
        self.donor, self.callers = "w-a", []  # type: ignore[var-annotated]

        def remote(fn: Any) -> Any:
            return types.SimpleNamespace(remote=fn)

        manifest = {
            "store": "redis",
            "format": "rdb",
            "store_version": "7",
            "size_bytes": len(self.content),
            "sha256": hashlib.sha256(self.content).hexdigest(),
            "counts": {"keys": 3},
        }
        self.status = remote(
            lambda: {
                "status": "awaiting-restore" if self.donor == "w-b" else "ready",
                "awaiting_restore": self.donor == "w-b",
                "donor": self.donor,
                "error": None,
            }
        )
        self.frozen: list[bool] = []
        self.backup_begin = remote(
            lambda node, freeze=False: (
                self.frozen.append(freeze) or self._by(node, {"transfer": "t1", "manifest": manifest})
            )
        )
        self.unfreeze = remote(lambda: self.frozen.append(False))
        self.read_chunk = remote(lambda tid, off, size: self.content[off : off + size])
        self.transfer_end = remote(lambda tid: None)
        self.counts = remote(lambda node: self._by(node, {"keys": 3}))
        self.move_to = remote(lambda to, frozen_only=False: setattr(self, "donor", to))
        self.check_target = remote(lambda to: None)
        self.restore_begin = remote(
            lambda manifest, node: FakeRay.exceptions.RayTaskError(StoreError("no space left on device"))
        )

    def _by(self, node: str, value: Any) -> Any:
        self.callers.append(node)
        return value


def test_failed_move_says_the_new_store_is_empty_and_keeps_the_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = FakeSupervisor()
    monkeypatch.setitem(sys.modules, "ray", FakeRay(actor=sup))
    r = CliRunner().invoke(app, ["stores", "move", "redis", "--to", "w-b", "--data-dir", str(tmp_path)])
    assert isinstance(r.exception, CliError), r.output
    msg = str(r.exception)
    (dest,) = (tmp_path / "backups").iterdir()
    assert msg.startswith(f"redis on w-b is EMPTY (the backup is at {dest}); it serves nobody until ")
    assert f"`rma stores restore redis {dest}`" in msg and "`rma stores serve redis`" in msg
    assert "the old volume stays on w-a" in msg and "no space left on device" in msg and "\n" not in msg
    assert sup.callers == ["node-here"]  # the backup names the caller's node
    assert sup.frozen == [True]  # taken frozen; past the switch a failure does not unfreeze the old store
    # the backup: a private directory of private files
    assert mode(dest) == 0o700 and mode(dest / "redis.rdb") == 0o600 and mode(dest / "manifest.json") == 0o600
    assert (dest / "redis.rdb").read_bytes() == sup.content
    # the store is pinned on w-b now: the pool's data dir keeps that for a GCS that starts again empty
    assert load_pins(tmp_path / PINS_FILE)["redis"]["donor"] == "w-b" and mode(tmp_path / PINS_FILE) == 0o600


class FakeRedis:
    """BGSAVE refused while an AOF rewrite runs, then taken; the save is done after two polls."""

    def __init__(self, refusals: list[str]) -> None:
        self.refusals, self.polls, self.saves = refusals, 0, 0

    def bgsave(self, schedule: bool = True) -> bool:
        assert not schedule  # a scheduled save answers OK before it has started
        if self.refusals:
            raise redis.ResponseError(self.refusals.pop(0))
        self.saves += 1
        return True

    def info(self, section: str) -> dict[str, Any]:
        self.polls += 1
        busy = self.saves and self.polls < 3
        return {"rdb_bgsave_in_progress": int(bool(busy)), "rdb_last_bgsave_status": "ok"}


def test_redis_bgsave_waits_for_a_running_rewrite_and_needs_no_lastsave_change(tmp_path: Path) -> None:
    naps: list[float] = []
    r = FakeRedis(
        [
            "Background append only file rewriting in progress",
            "Another child process is active (AOF?): can't BGSAVE right now.",
        ]
    )
    backup.redis_bgsave(r, 600, tmp_path, sleep=naps.append)
    assert r.saves == 1 and not r.refusals and sum(naps) < 2  # never the 600 s a same-second LASTSAVE cost
    with pytest.raises(StoreError, match="redis BGSAVE failed: ERR no disk"):
        backup.redis_bgsave(FakeRedis(["ERR no disk"]), 600, tmp_path, sleep=naps.append)


def test_backup_never_writes_into_or_removes_a_file_that_was_there(tmp_path: Path) -> None:
    from rma_ray.cli.stores import _download

    (tmp_path / "redis.rdb").write_text("someone's")
    with pytest.raises(CliError, match="exists already"):
        _download(FakeRay(), FakeSupervisor(), "redis", tmp_path)
    assert (tmp_path / "redis.rdb").read_text() == "someone's" and mode(tmp_path) == 0o700


def test_a_move_that_fails_before_its_switch_gives_the_store_its_writes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = FakeSupervisor()
    sup.move_to = types.SimpleNamespace(
        remote=lambda to, frozen_only=False: FakeRay.exceptions.RayTaskError(StoreError("w-b is not online"))
    )
    monkeypatch.setitem(sys.modules, "ray", FakeRay(actor=sup))
    r = CliRunner().invoke(app, ["stores", "move", "redis", "--to", "w-b", "--data-dir", str(tmp_path)])
    assert isinstance(r.exception, CliError) and "w-b is not online" in str(r.exception), r.output
    assert sup.frozen == [True, False] and sup.donor == "w-a"  # frozen for the backup, then unfrozen
    assert not (tmp_path / PINS_FILE).exists()  # nothing was pinned elsewhere


def test_a_given_up_move_cannot_switch_and_a_switching_one_cannot_be_unfrozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay([{"Alive": True, "Labels": {**TRUSTED_DATA, "rma.io/node": "w-b"}}])
    monkeypatch.setitem(sys.modules, "ray", fake)
    sup = bare_supervisor(tmp_path)
    with pytest.raises(StoreError, match="takes writes again"):  # its freeze undone: a late move_to refused
        sup.move_to("w-b", frozen_only=True)
    assert not fake.started and not (sup.volume / PIN_FILE).exists()
    with pytest.raises(StoreError, match="not a trusted data donor"):  # a mistyped target, before any freeze
        sup.check_target("w-typo")
    sup.frozen = True
    sup.move_to("w-b", frozen_only=True)
    assert fake.started and sup.switching
    with pytest.raises(StoreError, match="switching to its new donor"):
        sup.unfreeze()


def test_a_switch_that_answered_late_is_followed_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """move_to's answer was lost, but the supervisor refuses to unfreeze because its switch began: the CLI goes
    on to fill the store on its new donor (which never answers here: it says the new store is EMPTY)."""
    sup = FakeSupervisor()
    sup.move_to = types.SimpleNamespace(
        remote=lambda to, frozen_only=False: FakeRay.exceptions.GetTimeoutError("no answer")
    )
    sup.unfreeze = types.SimpleNamespace(
        remote=lambda: FakeRay.exceptions.RayTaskError(
            StoreError("redis is switching to its new donor: later")
        )
    )
    monkeypatch.setitem(sys.modules, "ray", FakeRay(actor=sup))
    r = CliRunner().invoke(
        app, ["stores", "move", "redis", "--to", "w-b", "--wait", "1", "--data-dir", str(tmp_path)]
    )
    assert isinstance(r.exception, CliError), r.output
    assert str(r.exception).startswith("redis on w-b is EMPTY"), r.exception
    assert "it went ahead" in r.output


def test_only_a_store_a_move_pinned_here_awaits_its_restore() -> None:
    moved = moved_pin("redis", "w-b")
    own = {"store": "redis", "donor": "w-b", "labelled": True}  # after the restore, or never moved
    table = [  # (the store's pin, the volume's pin here, donor here, awaits)
        (moved, None, "w-b", True),  # the move's new supervisor
        (moved, moved, "w-a", False),  # the old donor's volume: it waits for w-b (pin_decision), never serves
        (own, None, "w-b", False),  # restarted by Ray on its own pinned volume: serves as before
        (
            own,
            {**own, "awaiting_restore": True},
            "w-b",
            True,
        ),  # restarted mid-move, the GCS seeded without it
        (own, {**moved, "donor": "w-a"}, "w-b", False),  # an older move's marker for another donor
        (None, None, "w-b", False),
    ]
    for pin, volume_pin, donor, awaits in table:
        assert awaits_restore(pin, volume_pin, donor) is awaits, (pin, volume_pin, donor)


def test_a_fresh_gcs_seeded_mid_move_still_holds_the_moved_store_back(tmp_path: Path) -> None:
    """The GCS starts again empty after the move's switch but before the new supervisor first ran (its volume
    has no pin yet): the operator's copy keeps the marker, so the seeded pin holds the store back; once the
    store serves (`served`, called by `rma stores move|serve|restore`), a fresh GCS seeded again lets it serve."""
    path = tmp_path / PINS_FILE
    save_pins(path, {"redis": moved_pin("redis", "w-b"), "postgres": {"store": "postgres", "donor": "head"}})
    seeded = seed_pin(None, load_pins(path)["redis"])
    assert seeded is not None and seeded["donor"] == "w-b"
    assert awaits_restore(seeded, None, "w-b")  # no volume pin on w-b yet: the marker comes from the file
    served(path, "redis")
    kept = load_pins(path)
    assert kept["redis"]["donor"] == "w-b" and "awaiting_restore" not in kept["redis"]
    assert not awaits_restore(seed_pin(None, kept["redis"]), None, "w-b")
    assert kept["postgres"] == {"store": "postgres", "donor": "head"}  # the others untouched
    before = path.read_bytes()
    served(path, "postgres")  # no marker: the file is not rewritten
    served(path, "chroma")  # no pin at all
    assert path.read_bytes() == before


def moved_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[StoreSupervisor, dict[bytes, Any]]:
    """A redis supervisor a move created on w-b, its store up and empty; and the GCS's key-value store."""
    gcs: dict[bytes, Any] = {}
    kv = types.ModuleType("ray.experimental.internal_kv")
    kv._internal_kv_put = lambda key, value, **kw: gcs.__setitem__(key, value)  # type: ignore[attr-defined]
    kv._internal_kv_get = lambda key, **kw: gcs.get(key)  # type: ignore[attr-defined]
    experimental = types.ModuleType("ray.experimental")
    experimental.internal_kv = kv  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    monkeypatch.setitem(sys.modules, "ray.experimental", experimental)
    monkeypatch.setattr(supervisor, "_ray_node", {"trusted": {"Alive": True, "Labels": TRUSTED_DATA}}.get)
    sup = bare_supervisor(tmp_path, "redis", donor="w-b")
    sup.labels, sup.node_id, sup.host, sup.port = {"rma.io/node": "w-b"}, "n2", "10.0.0.2", 6390
    sup.creds = {"user": "rma", "password": "secret"}
    sup.state, sup.error, sup.ready_s, sup.restarts, sup.adopted = "ready", None, 0.5, 0, False
    sup.firewall = types.SimpleNamespace(state="off")
    sup.transfers_dir, sup._transfers = tmp_path / ".redis-transfers", {}
    sup._ready = threading.Event()
    sup._ready.set()
    sup.pin = moved_pin("redis", "w-b")
    sup.awaiting_restore = awaits_restore(sup.pin, None, "w-b")
    sup._record_pin()  # as its start does
    return sup, gcs


def test_a_moved_store_serves_nobody_before_its_data_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup, gcs = moved_supervisor(tmp_path, monkeypatch)
    # persistent: a supervisor Ray restarts mid-move reads this pin and waits too
    assert json.loads((sup.volume / PIN_FILE).read_text())["awaiting_restore"] is True
    st = sup.status()
    assert st["status"] == "awaiting-restore" and "being moved to w-b: waiting for its data" in st["error"]
    sup._ready.clear()  # not ready either: still refused at once, not after the timeout
    with (
        monkeypatch.context() as m,
        pytest.raises(StoreError, match="redis is being moved to w-b: waiting for"),
    ):
        # the empty store is never handed out, and no caller is held for it: endpoint never waits for readiness
        m.setattr(sup._ready, "wait", lambda timeout=None: pytest.fail("the caller was held for readiness"))
        sup.endpoint(30, "trusted")
    sup._ready.set()
    # the move's own calls still work; its restore, held for its count check, does not serve yet
    content = b"REDIS0011"
    tid, path = sup._new_transfer(manifest={"sha256": hashlib.sha256(content).hexdigest()})
    path.write_bytes(content)
    monkeypatch.setattr(sup, "_restore_stopped", lambda path: None)
    assert sup.restore_apply(tid, hold=True)["status"] == "awaiting-restore"
    with pytest.raises(StoreError, match="waiting for its data"):
        sup.endpoint(0.1, "trusted")
    assert sup.serve("trusted")["status"] == "ready"
    assert sup.endpoint(0.1, "trusted")["password"] == "secret"
    # and for good: neither pin holds a restarted incarnation back
    assert "awaiting_restore" not in json.loads((sup.volume / PIN_FILE).read_text())
    assert "awaiting_restore" not in json.loads(gcs[b"store-pin/redis"])


def test_a_plain_restore_lets_a_moved_store_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The way out of a move that failed after its switch: `rma stores restore STORE BACKUP`."""
    sup, _ = moved_supervisor(tmp_path, monkeypatch)
    tid, path = sup._new_transfer(manifest={"sha256": hashlib.sha256(b"").hexdigest()})
    path.touch()
    monkeypatch.setattr(sup, "_restore_stopped", lambda path: None)
    assert sup.restore_apply(tid)["status"] == "ready" and not sup.awaiting_restore


class MovingSupervisor(FakeSupervisor):
    """A redis move that reaches its new store: the restore is held for the count check, then `serve`."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.calls: list[Any] = []

        def remote(fn: Any) -> Any:
            return types.SimpleNamespace(remote=fn)

        self.status = remote(
            lambda: {
                "status": "awaiting-restore" if self.donor == "w-b" else "ready",
                "awaiting_restore": self.donor == "w-b",
                "donor": self.donor,
                "error": None,
            }
        )
        self.restore_begin = remote(lambda manifest, node: "t2")
        self.write_chunk = remote(lambda tid, chunk: len(chunk))
        self.restore_apply = remote(
            lambda tid, hold=False: self.calls.append(("apply", hold)) or {"status": "x"}
        )
        self.counts = remote(lambda node: counts)
        self.serve = remote(lambda node: self.calls.append("serve") or {"status": "ready"})


@pytest.mark.parametrize("counts", [{"keys": 3}, {"keys": 2}])
def test_a_moved_store_serves_once_its_counts_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counts: dict[str, int]
) -> None:
    sup = MovingSupervisor(counts)
    monkeypatch.setitem(sys.modules, "ray", FakeRay(actor=sup))
    r = CliRunner().invoke(app, ["stores", "move", "redis", "--to", "w-b", "--data-dir", str(tmp_path)])
    if counts == {"keys": 3}:
        assert r.exit_code == 0 and "redis moved from w-a to w-b (ready; counts match" in r.output, r.output
        assert sup.calls == [("apply", True), "serve"]
        # the operator's copy of the pin: on w-b, no longer awaiting (a fresh GCS seeded from it serves)
        assert load_pins(tmp_path / PINS_FILE)["redis"]["donor"] == "w-b"
        assert "awaiting_restore" not in load_pins(tmp_path / PINS_FILE)["redis"]
    else:  # held: the operator checks it, and a plain restore of the backup lets it serve
        (dest,) = (tmp_path / "backups").iterdir()
        # still awaiting in the operator's copy too: a fresh GCS seeded from it holds the store back
        assert load_pins(tmp_path / PINS_FILE)["redis"]["awaiting_restore"] is True
        assert isinstance(r.exception, CliError), r.output
        assert f"it serves nobody until `rma stores restore redis {dest}`" in str(r.exception)
        assert "`rma stores serve redis`" in str(r.exception)
        assert sup.calls == [("apply", True)]


def test_serve_refuses_and_keeps_waiting_when_the_gcs_pin_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GCS pin left with the marker would hold a restarted incarnation back while this one serves; one
    written without it and a volume pin with it, the other way round: `serve` is all or nothing."""
    sup, gcs = moved_supervisor(tmp_path, monkeypatch)
    tries: list[bytes] = []

    def busy(key: bytes, value: Any, **kw: Any) -> None:
        tries.append(key)
        raise TimeoutError("GCS busy")

    monkeypatch.setattr(sys.modules["ray.experimental"].internal_kv, "_internal_kv_put", busy)
    monkeypatch.setattr(supervisor, "PIN_WRITE_S", 0.6)
    with pytest.raises(
        StoreError, match="redis's pin could not be written .*GCS busy.*try `rma stores serve redis` again"
    ):
        sup.serve("trusted")
    assert len(tries) > 1  # tried again before refusing
    assert sup.awaiting_restore and sup.status()["status"] == "awaiting-restore"
    assert json.loads((sup.volume / PIN_FILE).read_text())["awaiting_restore"] is True
    assert json.loads(gcs[b"store-pin/redis"])["awaiting_restore"] is True
    with pytest.raises(StoreError, match="waiting for its data"):
        sup.endpoint(0.1, "trusted")


def test_serve_is_not_held_behind_a_supervision_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup, gcs = moved_supervisor(tmp_path, monkeypatch)
    with sup._lock:  # a `_bring_up` of up to 120 s holds this
        done = threading.Thread(target=sup.serve, args=("trusted",))
        done.start()
        done.join(5)
        assert not done.is_alive() and not sup.awaiting_restore
    assert "awaiting_restore" not in json.loads(gcs[b"store-pin/redis"])


def test_a_start_never_takes_the_marker_off_the_gcs_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move pinned the store here with its marker after this supervisor read its pin (or read none):
    recording its own pin keeps the marker, so the store still awaits its restore."""
    sup, gcs = moved_supervisor(tmp_path, monkeypatch)
    sup.awaiting_restore = False
    gcs[b"store-pin/redis"] = json.dumps(moved_pin("redis", "w-b"))
    sup._record_pin()
    assert sup.awaiting_restore and json.loads(gcs[b"store-pin/redis"])["awaiting_restore"] is True
    # a pin for another donor, or none: its own, without a marker
    gcs[b"store-pin/redis"] = json.dumps(moved_pin("redis", "w-c"))
    sup.awaiting_restore = False
    sup._record_pin()
    assert not sup.awaiting_restore and "awaiting_restore" not in json.loads(gcs[b"store-pin/redis"])


def test_a_pin_the_gcs_cannot_give_is_not_guessed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GCS not answering is not "no pin": the volume's copy may lack the move's marker."""
    sup = bare_supervisor(tmp_path, "redis", donor="w-b")
    sup._write_volume_pin({"store": "redis", "donor": "w-b", "labelled": True})
    asked: list[str] = []

    def unreadable(store: str) -> Any:
        asked.append(store)
        raise TimeoutError("GCS busy")

    monkeypatch.setattr(supervisor, "read_pin", unreadable)
    monkeypatch.setattr(supervisor, "PIN_READ_S", 0.3)
    with pytest.raises(StoreError, match="GCS busy"):
        sup._pin()
    assert asked  # asked, and again until PIN_READ_S ran out
    monkeypatch.setattr(supervisor, "read_pin", lambda store: None)  # no pin there: the volume's
    assert sup._pin() == {"store": "redis", "donor": "w-b", "labelled": True}


def test_a_store_awaiting_its_restore_is_not_backed_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup, _ = moved_supervisor(tmp_path, monkeypatch)
    sup.runtime = types.SimpleNamespace(pid=1)
    with pytest.raises(StoreError, match="redis on w-b awaits a move's restore: it holds no data of its own"):
        sup.backup_begin("trusted")
    assert not sup._transfers


def test_stores_serve_serves_what_a_moved_store_holds_after_asking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = MovingSupervisor({"keys": 3})
    sup.donor = "w-b"
    monkeypatch.setitem(sys.modules, "ray", FakeRay(actor=sup))
    save_pins(tmp_path / PINS_FILE, {"redis": moved_pin("redis", "w-b")})  # the move's copy, kept
    runner = CliRunner()
    r = runner.invoke(app, ["stores", "serve", "redis", "--data-dir", str(tmp_path)], input="n\n")
    assert isinstance(r.exception, CliError) and "still awaits its restore: nothing changed" in str(
        r.exception
    )
    assert sup.calls == [] and load_pins(tmp_path / PINS_FILE)["redis"]["awaiting_restore"] is True
    r = runner.invoke(app, ["stores", "serve", "redis", "--data-dir", str(tmp_path)], input="y\n")
    assert r.exit_code == 0 and "redis on w-b serves its data as it is (ready)" in r.output, r.output
    assert "awaiting_restore" not in load_pins(tmp_path / PINS_FILE)["redis"]
    r = runner.invoke(app, ["stores", "serve", "redis", "--yes", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and sup.calls == ["serve", "serve"], r.output
    sup.donor = "w-a"  # not awaiting a restore: refused, nothing asked
    # a serve that went through but answered late left this machine's copy marked: the refused run clears it
    save_pins(tmp_path / PINS_FILE, {"redis": moved_pin("redis", "w-b")})
    r = runner.invoke(app, ["stores", "serve", "redis", "--yes", "--data-dir", str(tmp_path)])
    assert isinstance(r.exception, CliError), r.output
    assert str(r.exception) == "redis is ready on w-a, not awaiting a restore: nothing to serve"
    assert sup.calls == ["serve", "serve"]
    assert "awaiting_restore" not in load_pins(tmp_path / PINS_FILE)["redis"]


def test_a_move_whose_new_store_serves_already_stops_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target `ready` without awaiting its restore lost the move's mark: the move does not restore into a
    store the services may be writing to."""
    sup = MovingSupervisor({"keys": 3})
    sup.status = types.SimpleNamespace(remote=lambda: {"status": "ready", "donor": sup.donor, "error": None})
    monkeypatch.setitem(sys.modules, "ray", FakeRay(actor=sup))
    r = CliRunner().invoke(app, ["stores", "move", "redis", "--to", "w-b", "--data-dir", str(tmp_path)])
    assert isinstance(r.exception, CliError), r.output
    msg = str(r.exception)
    assert "redis on w-b is ready, not awaiting its restore: the move's mark was lost" in msg
    assert "rma stores restore redis" in msg and "rma stores serve redis" in msg and "\n" not in msg
    assert sup.calls == []  # nothing restored into it


def test_a_serve_that_answered_late_but_went_through_is_a_moved_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = MovingSupervisor({"keys": 3})
    served = {"late": False}

    def late(node: str) -> Any:
        served["late"] = True
        return FakeRay.exceptions.GetTimeoutError("no answer")

    sup.serve = types.SimpleNamespace(remote=late)
    status = sup.status.remote
    sup.status = types.SimpleNamespace(
        remote=lambda: {
            **status(),
            **({"status": "ready", "awaiting_restore": False} if served["late"] else {}),
        }
    )
    monkeypatch.setitem(sys.modules, "ray", FakeRay(actor=sup))
    r = CliRunner().invoke(app, ["stores", "move", "redis", "--to", "w-b", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and "redis moved from w-a to w-b (ready; counts match" in r.output, r.output
    served["late"] = False  # and one that did not go through says how to go on
    sup.status = types.SimpleNamespace(remote=status)
    sup.donor = "w-a"
    again = tmp_path / "again"  # a backup directory of its own
    r = CliRunner().invoke(app, ["stores", "move", "redis", "--to", "w-b", "--data-dir", str(again)])
    assert isinstance(r.exception, CliError), r.output
    assert "redis on w-b holds its data but it serves nobody until" in str(r.exception)
    assert "`rma stores serve redis`" in str(r.exception)


def test_a_plain_restore_sends_no_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor started by the previous version has `restore_apply(tid)` only."""
    sup = MovingSupervisor({"keys": 3})
    sup.restore_apply = types.SimpleNamespace(
        remote=lambda tid: sup.calls.append("apply") or {"status": "ready"}
    )
    src = tmp_path / "b"
    src.mkdir()
    (src / "redis.rdb").write_bytes(sup.content)
    manifest = {
        "store": "redis",
        "file": "redis.rdb",
        "size_bytes": len(sup.content),
        "sha256": hashlib.sha256(sup.content).hexdigest(),
    }
    (src / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setitem(sys.modules, "ray", FakeRay(actor=sup))
    r = CliRunner().invoke(app, ["stores", "restore", "redis", str(src), "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and sup.calls == ["apply"], r.output


def test_up_reports_a_store_awaiting_its_restore_and_does_not_count_it_failed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rma up` mid-move (or after a move that failed past its switch): the store is settled, its line says
    which command ends the wait; neither pending until the timeout nor a failure."""
    from deployments import __main__ as deployments_main

    awaiting = {
        "status": "awaiting-restore",
        "error": "redis is being moved to w-b: waiting for its data (…)",
        "node_ip": "10.0.0.2",
        "port": 6390,
        "ready_s": 0.5,
    }
    actor = types.SimpleNamespace(status=types.SimpleNamespace(remote=lambda: awaiting))
    fake = FakeRay()
    unavailable = type("ActorUnavailableError", (Exception,), {})
    monkeypatch.setattr(FakeRay.exceptions, "ActorUnavailableError", unavailable, raising=False)
    monkeypatch.setattr(FakeRay.exceptions, "RayError", Exception, raising=False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(deployments_main, "placement", lambda on: TRUSTED_DATA)
    monkeypatch.setattr(deployments_main, "seed_pins", lambda stores: None)
    monkeypatch.setattr(deployments_main, "keep_pins", lambda stores: None)
    monkeypatch.setattr(supervisor, "ensure", lambda store, **kw: actor)
    assert deployments_main.stores_up(["redis"], "process", "data", 5, {}) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["store"] == "redis" and line["status"] == "awaiting-restore"
    assert line["error"].startswith("redis is being moved to w-b")


def test_a_moved_store_whose_runtime_cannot_start_still_marks_its_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No docker on the new donor: the supervisor fails to start its store, but the move's marker reaches the
    volume, so a later incarnation (docker installed, the GCS started again empty) still waits."""
    gcs: dict[bytes, Any] = {pin_key_redis: json.dumps(moved_pin("redis", "w-b"))}
    kv = types.ModuleType("ray.experimental.internal_kv")
    kv._internal_kv_put = lambda key, value, **kw: gcs.__setitem__(key, value)  # type: ignore[attr-defined]
    kv._internal_kv_get = lambda key, **kw: gcs.get(key)  # type: ignore[attr-defined]
    experimental = types.ModuleType("ray.experimental")
    experimental.internal_kv = kv  # type: ignore[attr-defined]
    fake = FakeRay()
    fake.get_runtime_context = lambda: types.SimpleNamespace(  # type: ignore[method-assign]
        get_node_id=lambda: "n2", get_node_labels=lambda: {"rma.io/node": "w-b"}, get_actor_id=lambda: "a1"
    )
    fake.util = types.SimpleNamespace(get_node_ip_address=lambda: "10.0.0.2")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.experimental", experimental)

    def no_docker(*a: Any) -> Any:
        raise StoreError("docker is not installed on this node")

    monkeypatch.setattr(supervisor, "make_runtime", no_docker)
    monkeypatch.setattr(supervisor, "credentials", lambda volume: {"user": "rma", "password": "secret"})
    monkeypatch.setattr(supervisor, "Settings", lambda: types.SimpleNamespace(data_dir=tmp_path))
    monkeypatch.setattr(supervisor, "wanted", lambda data_dir: False)
    monkeypatch.setattr(
        supervisor, "StoreFirewall", lambda *a: types.SimpleNamespace(state="off", enabled=False)
    )
    monkeypatch.setattr(StoreSupervisor, "_report_loop", lambda self: None)  # nobody to report to here
    sup = StoreSupervisor("redis", runtime="docker", data_dir=str(tmp_path))
    assert sup.state == "failed" and "docker is not installed" in str(sup.error)
    assert json.loads((tmp_path / "redis" / PIN_FILE).read_text())["awaiting_restore"] is True
    assert json.loads(gcs[pin_key_redis])["awaiting_restore"] is True
