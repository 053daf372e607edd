"""`rma stores list|backup|restore|move|serve`: the pool's data stores, run on the operator's machine (the Ray head).

`list` asks the coordinator (admin key), as the registry page does. `backup` and `restore` join the pool's Ray
cluster as a driver (the pool's `cluster_token` from the data dir, or the caller's RAY_ADDRESS and
RAY_AUTH_TOKEN_PATH) and talk to the store's supervisor actor by name, which runs the store's own tool on the
store's node (deployments/stores/backup.py). The bytes come and go in chunks of at most 8 MiB, so a large
backup is never whole in memory. A backup is a directory: the store's file and `manifest.json` (store, format,
version, time, size, sha256), written last, so a directory with a manifest is a whole backup."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from rma_ray import poolinfo
from rma_ray.cli.admin import admin_client
from rma_ray.cli.common import (
    HELP,
    CoordinatorOpt,
    DataDirOpt,
    JsonOpt,
    KeyFileOpt,
    data_dir_of,
    err,
    fail,
    out,
    print_json,
    shown,
)
from rma_ray.poolinfo import STORE_NAMES

stores_app = typer.Typer(help="The pool's data stores: list, back up, restore, move, serve.", **HELP)
MANIFEST = "manifest.json"
CHUNK = 8 * 1024 * 1024  # the supervisor's own cap (deployments/stores/backup.py CHUNK)
FILES = {"postgres": "postgres.dump", "redis": "redis.rdb", "chroma": "chroma.tar", "graph": "graph.tar"}
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="the pool's Ray address (default: this pool's pool.json, or RAY_ADDRESS)"),
]


def _store(name: str) -> str:
    if name not in STORE_NAMES:
        fail(f"no store {name!r}; the pool's stores are: {', '.join(STORE_NAMES)}")
    return name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def read_manifest(src: Path, store: str) -> tuple[dict[str, Any], Path]:
    """The backup at `src`, checked before anything is sent: its manifest names this store, and its file has
    the manifest's size and sha256. A mismatch is one line that says what is wrong."""
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        fail(f"{src} holds no {MANIFEST}: not a backup made by `rma stores backup` (or an unfinished one)")
    except (OSError, ValueError) as exc:
        fail(f"cannot read {src / MANIFEST}: {exc}")
    if not isinstance(manifest, dict):
        fail(f"{src / MANIFEST} is not a backup manifest")
    if manifest.get("store") != store:
        fail(
            f"{src} is a backup of {manifest.get('store')!r}, not of {store}: "
            f"restore it with `rma stores restore {manifest.get('store')} {src}`"
        )
    data = src / str(manifest.get("file") or FILES[store])
    if data.parent != src or not data.is_file():
        fail(f"{src} lacks the backup's file {data.name}: copy the whole backup directory")
    if data.stat().st_size != manifest.get("size_bytes") or _sha256(data) != manifest.get("sha256"):
        fail(
            f"{data} does not match {MANIFEST} (size or sha256 differ): the backup is damaged or was changed"
        )
    return manifest, data


@contextmanager
def pool_ray(data_dir: Path | None, address: str | None) -> Iterator[Any]:
    """A Ray driver connected to the pool (its token by path, never on a command line); the caller's own
    connection where it is a Ray driver already (a script, a test)."""
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield sys.modules["ray"]
        return
    ddir = data_dir_of(data_dir)
    address = address or poolinfo.try_read(ddir).ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        fail(f"no running pool found in {ddir} (no pool.json with ray_address): pass --data-dir or --address")
    token = ddir / "cluster_token"
    if token.exists():
        os.environ.update(
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
        )
        os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.setdefault("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "minor")
    import logging

    import ray

    try:
        ray.init(address=address, namespace="rma", logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        fail(f"cannot reach the pool's Ray cluster at {address}: {exc}")
    try:
        yield ray
    finally:
        ray.shutdown()


def private_dir(dest: Path) -> None:
    """The backup's directory, 0700: created so, or an existing empty one made so (a backup is the store's
    whole data)."""
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        dest.mkdir(mode=0o700)
    except FileExistsError:
        pass
    os.chmod(dest, 0o700)  # the umask may have taken bits off the mode, or the directory existed


def private_file(path: Path) -> Any:
    """A new file, 0600, never one that exists (O_EXCL: not a link planted there either)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _here(ray: Any) -> str:
    """This driver's node id: the supervisor hands its store's data only to a trusted node's caller."""
    return str(ray.get_runtime_context().get_node_id())


def _supervisor(ray: Any, store: str) -> Any:
    try:
        return ray.get_actor(f"rma-store-{store}", namespace="rma")
    except ValueError:
        fail(f"the pool runs no {store} store (no supervisor rma-store-{store}): `rma up` starts the stores")


def _call(ray: Any, ref: Any, timeout: float = 3600) -> Any:
    """A supervisor call's result; a refusal from it (StoreError) becomes one line."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        fail(str(cause) if cause is not None else str(exc).strip().splitlines()[-1])
    except ray.exceptions.GetTimeoutError:
        fail(f"the store's supervisor did not answer within {timeout:g} s")
    except ray.exceptions.RayActorError as exc:
        fail(f"the store's supervisor is not running (its node gone?): {str(exc).splitlines()[0]}")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def _download(ray: Any, sup: Any, store: str, dest: Path, freeze: bool = False) -> dict[str, Any]:
    """Have the supervisor take a backup, and bring it into `dest` chunk by chunk; returns its manifest.
    `freeze` (a move): the store refuses writes from before the backup on (its supervisor's backup_begin)."""
    err.print(
        f"backing up {store} on its node{' (writes refused until it runs on its new donor)' if freeze else ''} …",
        highlight=False,
    )
    begun = _call(ray, sup.backup_begin.remote(_here(ray), freeze))
    tid, manifest = begun["transfer"], dict(begun["manifest"])
    manifest["file"] = FILES[store]
    private_dir(dest)
    data = dest / FILES[store]
    try:
        fresh = private_file(data)
    except FileExistsError:  # never write into (or, failing, remove) a file that was there
        sup.transfer_end.remote(tid)
        fail(f"{data} exists already: give a new directory for the backup")
    h, done = hashlib.sha256(), 0
    try:
        with _progress() as bar, fresh as f:
            task = bar.add_task(f"{store} → {dest}", total=manifest["size_bytes"])
            nxt = sup.read_chunk.remote(tid, 0, CHUNK)
            while done < manifest["size_bytes"]:
                chunk = _call(ray, nxt, timeout=600)
                if not chunk:
                    fail(f"the backup of {store} ended early ({done} of {manifest['size_bytes']} bytes)")
                done += len(chunk)
                if done < manifest["size_bytes"]:  # ask for the next while this one is written
                    nxt = sup.read_chunk.remote(tid, done, CHUNK)
                f.write(chunk)
                h.update(chunk)
                del chunk
                bar.update(task, completed=done)
        if h.hexdigest() != manifest["sha256"]:
            fail(f"the backup of {store} arrived damaged (sha256 differs): try again")
        with private_file(dest / MANIFEST) as f:
            f.write((json.dumps(manifest, indent=2) + "\n").encode())
    except BaseException:
        data.unlink(missing_ok=True)
        raise
    finally:
        sup.transfer_end.remote(tid)  # the node's copy goes; a failure here changes nothing for the caller
    return manifest


def _upload(
    ray: Any, sup: Any, store: str, manifest: dict[str, Any], data: Path, what: str, hold: bool = False
) -> Any:
    """Send a checked backup to the supervisor, chunk by chunk, and have it restore it; returns its status.
    The store serves from then on (a moved one, too: the way out of a move that failed), unless `hold` (the
    move itself, which checks its counts first)."""
    tid = _call(ray, sup.restore_begin.remote(manifest, _here(ray)))
    size = data.stat().st_size
    with _progress() as bar, open(data, "rb") as f:
        task = bar.add_task(f"{what} → {store}", total=size)
        while chunk := f.read(CHUNK):
            bar.update(task, completed=_call(ray, sup.write_chunk.remote(tid, chunk), timeout=600))
    err.print(f"restoring {store} on its node …", highlight=False)
    # `hold` only when holding: a supervisor started by an earlier version takes no second argument
    return _call(ray, sup.restore_apply.remote(tid, True) if hold else sup.restore_apply.remote(tid))


@stores_app.command("backup")
def stores_backup(
    store: str,
    dest: Annotated[Path, typer.Argument(help="a new (or empty) directory for the backup")],
    address: AddressOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Back up a store with its own tool (pg_dump, Redis RDB, a directory snapshot) into DEST here."""
    _store(store)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        fail(f"{dest} exists and is not an empty directory: give a new directory for the backup")
    with pool_ray(data_dir, address) as ray:
        manifest = _download(ray, _supervisor(ray, store), store, dest)
    if as_json:
        return print_json({"dest": str(dest), **manifest})
    out.print(
        f"{store} backed up to {dest} ({manifest['size_bytes']} bytes, {manifest['format']}, "
        f"{store} {manifest['store_version']}, sha256 {manifest['sha256'][:12]}…)",
        highlight=False,
    )


@stores_app.command("restore")
def stores_restore(
    store: str,
    src: Annotated[Path, typer.Argument(help="a directory made by `rma stores backup`")],
    address: AddressOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Replace a store's data with a backup (the manifest's store and checksum are checked first)."""
    _store(store)
    manifest, data = read_manifest(src, store)
    with pool_ray(data_dir, address) as ray:
        st = _upload(ray, _supervisor(ray, store), store, manifest, data, str(src))
    if not st.get("awaiting_restore"):
        keep_served(data_dir_of(data_dir), store)
    out.print(
        f"{store} restored from {src} (backup of {manifest.get('created_at')}); status: {st['status']}",
        highlight=False,
    )


def ways_out(store: str, dest: Path) -> str:
    """How a moved store that awaits its restore comes to serve, for every failure line after a move's switch:
    the backup restored (its data not in), or `serve` (its data in, or to stop waiting)."""
    return (
        f"it serves nobody until `rma stores restore {store} {dest}` (its data not in) or "
        f"`rma stores serve {store}` (its data in, or to stop waiting)"
    )


def moved_empty(store: str, to: str, dest: Path, donor: str, exc: BaseException) -> str:
    """The one line a move that failed after the switch ends with: the store on `to` may run empty, serving
    nobody until a restore (its supervisor's `awaiting-restore`)."""
    cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return (
        f"{store} on {to} is EMPTY (the backup is at {dest}); {ways_out(store, dest)}; the old volume stays on "
        f"{donor} ({cause})"
    )


def keep_moved_pin(ddir: Path, store: str, to: str, strict: bool = False) -> None:
    """The moved store's pin, kept on the operator's machine too (deployments/__main__.py seeds the GCS).
    `strict` (a move from a backup, whose old volume keeps its own pin): not kept is a failure, not a warning."""
    from rma_ray.storepins import PINS_FILE, moved_pin, save_pins

    try:
        save_pins(ddir / PINS_FILE, {store: moved_pin(store, to)})
    except OSError as exc:
        why = f"the pin of {store} was not kept in {ddir / PINS_FILE}: {exc}"
        if strict:
            fail(f"{why}; fix that file's directory and run the move again (the store is pinned on {to})")
        err.print(f"warning: {why}", highlight=False)


def keep_served(ddir: Path, store: str) -> None:
    """The store serves its data now: the copy of its pin on this machine loses the move's marker (else a GCS
    that starts again empty would hold it back until `rma stores serve`). A failure is a warning: the store
    serves; the line says what a later fresh GCS would do."""
    from rma_ray.storepins import PINS_FILE, served

    try:
        served(ddir / PINS_FILE, store)
    except OSError as exc:
        err.print(
            f"warning: {ddir / PINS_FILE} still marks {store} as awaiting its restore ({exc}): after the pool's "
            f"next fresh start it waits until `rma stores serve {store}`",
            highlight=False,
        )


def _pins_writable(ddir: Path) -> None:
    """Before a switch: the pins file it must keep can be written (after it, a failure leaves the store live
    and empty on its new donor)."""
    from rma_ray.storepins import PINS_FILE

    path = ddir / PINS_FILE
    try:
        ddir.mkdir(parents=True, exist_ok=True)
        probe = ddir / (PINS_FILE + ".probe")
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        fail(f"{path} cannot be written ({exc}): fix that directory first; nothing moved")


def _pinned_donor(ray: Any, store: str) -> str | None:
    from ray.experimental import internal_kv

    try:
        raw = internal_kv._internal_kv_get(f"store-pin/{store}".encode(), namespace="rma")
        return str(json.loads(raw)["donor"]) if raw else None
    except Exception:  # noqa: BLE001 - unknown: the caller treats it as gone only with --force
        return None


def _donor_online(ray: Any, donor: str) -> bool:
    return any(n.get("Alive") and (n.get("Labels") or {}).get("rma.io/node") == donor for n in ray.nodes())


def _unfreeze_or_switched(ray: Any, sup: Any, store: str, to: str) -> bool:
    """After a move failed before its switch answered: True when the switch went ahead after all."""
    try:
        _call(ray, sup.unfreeze.remote(), timeout=180)
        return False
    except BaseException as exc:  # noqa: BLE001 - which one decides what follows
        if "is switching to its new donor" in str(exc):
            return True
        if _pinned_donor(ray, store) == to:  # the old supervisor gone: replaced by the switch
            return True
        err.print(
            f"warning: {store} may still refuse writes ({exc}); its supervisor takes them again by itself "
            f"within 5 minutes",
            highlight=False,
        )
        return False


def _fill_moved(
    ray: Any, store: str, to: str, manifest: dict[str, Any], dest: Path, wait_s: float
) -> tuple[Any, Any, Any]:
    """After the switch: wait for the store on `to`, restore the backup into it, take its counts; returns its
    supervisor, its status and its counts. The store serves nobody yet: `_serve_moved`, once they are checked."""
    from rma_ray.waiting import GiveUp, WaitTimeout, wait_until

    err.print(f"starting {store} on {to} …", highlight=False)

    def there() -> Any:
        sup = ray.get_actor(f"rma-store-{store}", namespace="rma")
        st = ray.get(sup.status.remote(), timeout=5)
        if st["donor"] == to and st["status"] == "ready":  # it serves its empty store to the services
            raise GiveUp(
                f"{store} on {to} is ready, not awaiting its restore: the move's mark was lost, so the services "
                f"may be using it empty; run `rma stores restore {store} {dest}`, then "
                f"`rma stores serve {store}` if it still awaits"
            )
        return sup if st["donor"] == to and st["status"] == "awaiting-restore" else None

    try:
        new = wait_until(there, timeout=wait_s, interval=1, what=f"{store} to answer on {to}")
    except GiveUp as exc:
        fail(str(exc))
    except WaitTimeout:
        fail(f"{store} did not start on {to} within {wait_s:g} s")
    st = _upload(ray, new, store, manifest, dest / FILES[store], str(dest), hold=True)
    return new, st, _call(ray, new.counts.remote(_here(ray)))


def _serve_moved(ray: Any, new: Any, store: str, to: str, dest: Path) -> Any:
    """The moved store, its data restored and its counts checked: its endpoint goes to the services now. A
    `serve` that answered late may have gone through: its status is asked again before saying it failed."""
    try:
        return _call(ray, new.serve.remote(_here(ray)), timeout=60)
    except Exception as exc:  # CliError too: one line, the cause last
        try:
            st = ray.get(new.status.remote(), timeout=15)
        except Exception:  # noqa: BLE001 - not answering either: the failure line below says what to do
            st = None
        if st is not None and not st.get("awaiting_restore"):
            return st
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        fail(f"{store} on {to} holds its data but {ways_out(store, dest)} ({cause})")


def _unplaced(ray: Any, store: str) -> bool:
    """Whether the store's supervisor is one Ray cannot place now (pinned on a donor that is gone): Ray's own
    record of it says so, not a slow answer alone."""
    from ray.util.state import list_actors

    try:
        found = list_actors(filters=[("name", "=", f"rma-store-{store}")], timeout=30)
    except Exception as exc:  # noqa: BLE001 - the state API down: say so, change nothing
        fail(
            f"the {store} supervisor does not answer and Ray's actor state is unreadable ({exc}); nothing moved"
        )
    return bool(found) and all(a.state != "ALIVE" for a in found)


def _move_from_backup(
    store: str,
    to: str,
    src: Path,
    force: bool,
    ddir: Path,
    data_dir: Path | None,
    address: str | None,
    wait_s: float,
) -> None:
    """`rma stores move STORE --to DONOR --from-backup DIR`: the backup is checked first (a bad one moves
    nothing); a ready store moves only with --force (its data after the backup is dropped)."""
    from importlib.metadata import entry_points

    # the supervisors are the upper room's (deployments/): reached by the entry point it registers
    found = entry_points(group="rma.stores", name="move_unplaced")
    if not found:
        fail(
            "this install has no store supervisors (`rma.stores` entry points): run the move on the pool's head"
        )
    move_unplaced = next(iter(found)).load()
    manifest, _data = read_manifest(src, store)
    with pool_ray(data_dir, address) as ray:
        old = _supervisor(ray, store)
        try:
            was = ray.get(old.status.remote(), timeout=15)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            was = None
        if was is None:
            if not _unplaced(ray, store):
                fail(f"the {store} supervisor does not answer (it is busy?): try again; nothing moved")
            pinned = _pinned_donor(ray, store)
            if not force and (pinned is None or _donor_online(ray, pinned)):
                fail(
                    f"{store}'s donor {pinned or '(unknown: its pin is unreadable)'} may be online (its "
                    f"supervisor is being restarted?): moving it from a backup drops its data written since the "
                    f"backup; add --force to do so"
                )
            donor = pinned or "its donor"
            _pins_writable(ddir)
            if refused := move_unplaced(store, to):
                fail(refused)
        else:
            donor = str(was["waiting_for"] or was["donor"])
            # only a store whose donor is gone, or that failed, moves without --force: a starting, restarting,
            # backing-up or restoring one holds data newer than the backup
            back = was["waiting_for"] is not None and _donor_online(ray, str(was["waiting_for"]))
            if not force and back:
                fail(
                    f"{store} waits for {was['waiting_for']}, which is online again: it returns there with its "
                    f"data; add --force to move it from the backup instead (its data since the backup dropped)"
                )
            if not force and was["waiting_for"] is None and was["status"] != "failed":
                fail(
                    f"{store} is {was['status']} on {was['donor']}: moving it from a backup drops its data "
                    f"written since the backup; add --force to do so, or use `rma stores move {store} --to {to}`"
                )
            _pins_writable(ddir)
            _call(ray, old.move_to.remote(to), timeout=60)
        keep_moved_pin(ddir, store, to, strict=True)  # the store is pinned on `to` now, whatever follows
        try:
            new, st, after = _fill_moved(ray, store, to, manifest, src, wait_s)
        except Exception as exc:  # CliError too: one line, the cause last
            fail(moved_empty(store, to, src, donor, exc))
        if after != manifest.get("counts"):
            fail(
                f"{store} on {to} holds {after}, the backup {src} {manifest.get('counts')}: check it; "
                f"{ways_out(store, src)}"
            )
        st = _serve_moved(ray, new, store, to, src)
        keep_served(ddir, store)
    out.print(
        f"{store} moved to {to} from the backup {src} ({st['status']}; counts match the backup's: {after})",
        highlight=False,
    )


@stores_app.command("move")
def stores_move(
    store: str,
    to: Annotated[str, typer.Option("--to", help="the trusted data donor (its id) to move the store to")],
    address: AddressOpt = None,
    data_dir: DataDirOpt = None,
    wait_s: Annotated[
        float, typer.Option("--wait", help="seconds to wait for the store on its new donor")
    ] = 300,
    from_backup: Annotated[
        Path | None,
        typer.Option(
            "--from-backup",
            help="start the store on DONOR from this backup (`rma stores backup`) instead of its running data: "
            "for a store whose donor is gone",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="with --from-backup: also for a ready store (its newer data is dropped)"
        ),
    ] = False,
) -> None:
    """Move a store with its data to another trusted data donor: refuse writes, back up, start it there,
    restore, check the counts (it serves nobody there until then). From the backup on, writers get the store's
    error (PostgreSQL and Redis keep serving reads; Chroma and the graph store are stopped) until it answers on
    its new donor, so that no write is acknowledged and lost; a move that fails before its switch gives the
    store back its writes where it is. The old donor keeps its volume; the backup stays in the data dir's
    backups/.
    With --from-backup DIR: the store (waiting for a donor that is gone, or failed) starts on DONOR with the
    backup's data."""
    _store(store)
    ddir = data_dir_of(data_dir)
    if from_backup is not None:
        return _move_from_backup(store, to, from_backup, force, ddir, data_dir, address, wait_s)
    dest = ddir / "backups" / f"move-{store}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    with pool_ray(data_dir, address) as ray:
        old = _supervisor(ray, store)
        was = _call(ray, old.status.remote(), timeout=30)
        if was["status"] != "ready":
            fail(f"{store} is {was['status']} ({was.get('error')}); a move starts from a running store")
        _call(ray, old.check_target.remote(to), timeout=60)  # before anything is frozen
        _pins_writable(ddir)
        try:
            manifest = _download(ray, old, store, dest, freeze=True)
            _call(ray, old.move_to.remote(to, True), timeout=180)
        except BaseException as exc:
            # the supervisor decides under its lock: unfreeze succeeds (the move is given up: a late move_to
            # is refused) or is refused because the switch began (it goes ahead: fill the new store)
            if not _unfreeze_or_switched(ray, old, store, to) or not isinstance(exc, Exception):
                raise
            err.print(f"the switch to {to} answered late ({exc}); it went ahead", highlight=False)
        keep_moved_pin(ddir, store, to)  # the store is pinned on `to` now, whatever follows
        # from here on the store on `to` runs empty, serving nobody: any failure says so, and how to fill it
        try:
            new, st, after = _fill_moved(ray, store, to, manifest, dest, wait_s)
        except Exception as exc:  # CliError too: one line, the cause last
            fail(moved_empty(store, to, dest, was["donor"], exc))
        before = manifest.get("counts") or {}
        verdict = f"counts match: {after}"
        if after != before:
            # chroma and the graph store (backed up stopped) are counted just before they stop; the others are
            # counted frozen and must match exactly
            if (
                store in ("chroma", "graph")
                and before
                and set(after) >= set(before)
                and all(after[k] >= v for k, v in before.items())
            ):
                # a write between the count and the stop is in the snapshot, so the new store holds it too
                verdict = f"counts {after}, at least the {before} counted just before it stopped"
            else:
                fail(
                    f"{store} on {to} holds {after}, the backup {before}: check it; {ways_out(store, dest)}; "
                    f"the old volume stays on {was['donor']}"
                )
        st = _serve_moved(ray, new, store, to, dest)
        keep_served(ddir, store)
    out.print(
        f"{store} moved from {was['donor']} to {to} ({st['status']}; {verdict}); backup kept in {dest}",
        highlight=False,
    )


@stores_app.command("serve")
def stores_serve(
    store: str,
    address: AddressOpt = None,
    data_dir: DataDirOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
) -> None:
    """Let a moved store that awaits its restore serve the data it holds now, unchanged: after a move that failed
    once its data was in (the counts differed, or its last step did not answer), or to stop waiting for a
    restore. Changes no data; `rma stores restore` puts a backup in and serves too."""
    _store(store)
    with pool_ray(data_dir, address) as ray:
        sup = _supervisor(ray, store)
        st = _call(ray, sup.status.remote(), timeout=30)
        if not st.get("awaiting_restore"):
            # a serve that went through but answered late: this machine's copy of the pin may still be marked
            keep_served(data_dir_of(data_dir), store)
            fail(f"{store} is {st['status']} on {st['donor']}, not awaiting a restore: nothing to serve")
        if not yes and not typer.confirm(
            f"{store} on {st['donor']} serves what it holds now, as it is, to the pool's services: go on?"
        ):
            fail(f"{store} on {st['donor']} still awaits its restore: nothing changed")
        donor = st["donor"]
        st = _call(ray, sup.serve.remote(_here(ray)), timeout=60)
    keep_served(data_dir_of(data_dir), store)
    out.print(f"{store} on {donor} serves its data as it is ({st['status']})", highlight=False)


@stores_app.command("list")
def stores_list(
    coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None, as_json: JsonOpt = False
) -> None:
    """List the data stores as their supervisors report them (a store pinned to a donor that is gone shows
    `waiting for <donor>`)."""
    with admin_client(coordinator, admin_key_file) as client:
        rows = client.request("GET", "/api/admin/stores")
    if as_json:
        return print_json(rows)
    table = Table("store", "status", "runtime", "node", "address", "size", "note")
    for r in rows:
        node = "head" if r["node"] == "head" else f"{r['node']} {r.get('worker_name') or ''}".strip()
        table.add_row(
            r["name"],
            r["status"],
            r["runtime"],
            shown(node),
            f"{r['node_ip']}:{r['port']}" if r["port"] else "",
            f"{r['size_bytes'] / 1048576:.1f} MiB",
            shown(r["error"] or ""),
        )
    out.print(table)
