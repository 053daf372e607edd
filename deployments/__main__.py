"""`python -m deployments up|down|status|prepare`: the one driver of the Serve side. `rma up`, `rma down` and
an admin run it as a child process (a process that imports Ray caches the cluster's token settings, so the CLI
never does); the Ray cluster token comes from RAY_AUTH_TOKEN_PATH (`rma_ray.raynode.ray_env`). It owns the
data stores (their Ray supervisors), the services' schema migrations and the Serve apps, and prints JSON
lines, one object per event or result; an error is `{"error": ...}` and exit 1.

    python -m deployments up --address <gcs> [--stores redis,postgres|none] [--apps llm,services|none]
    python -m deployments down --address <gcs> [--stores ...] [--apps ...]   # stores stop; volumes stay
    python -m deployments status --address <gcs>                            # stores' and apps' states
    python -m deployments prepare                                           # convert the embedded LLM
    python -m deployments up --profile edge --edge NAME --address <edge gcs> --dashboard <edge dashboard> \
        --coordinator-url <url> --serve-port 8030 --apps llm,embeddings,documents  # an edge's apps

The edge profile (DESIGN.md, "Trust domains") applies an edge cluster's stateless apps
(`serve_config.EDGE_GROUPS`) to that cluster, with the edge's name and the coordinator's URL as their args (no
secret; the edge's own token comes from RAY_AUTH_TOKEN_PATH as for the core): never a store (`--stores` must be
none), never a service that sees client data.

The apps are applied the way KubeRay and `serve deploy` apply them: the config that
deployments/serve_config.py generates (embedded profile; the `RMA_*` settings of this process become the apps'
args), PUT on the dashboard's `/api/serve/applications/` (the dashboard of the cluster `--address` names,
unless `--dashboard`). Each app is prepared in turn (settings, the LLM's conversion, migrations), then applied
in a PUT that also names any other app already applied declaratively (Serve leaves those as they are and deletes
declarative apps a config leaves out), and waited for together: their replicas start side by side. The LLM
goes first, alone, until Serve has built it (`HEAD_START`); then every app in one PUT. On a warm start (the model
converted already) the LLM's PUT comes before the stores start (`early_head_start`): its build, replica and engine
need no store, and their chain is the longest of a warm `rma up` (bench.pool_down, A/B interleaved on one box:
109.4 / 104.5 s against 123.5 / 119.0 s). Serve's controller builds each app in a `build_serve_application`
task; serve_config.py says where it runs.

Lines of `up`, in order:

    {"store": "redis", "status": "ready", "where": "the head", "node_ip": ..., "port": ..., "ready_s": ...}
    {"done": "stores", "failed": 0}
    {"migration": "services", "schema": "<revision, or null: Postgres not reachable, the replicas migrate>"}
    {"app": "llm", "status": "running", "serve_apps": ["rma-llm", "rma-inference"], "ready_s": 61.2}
    {"app": "vision", "status": "failed", "error": "..."}   # or "timeout"; the other apps still go on
                                                            # (apps in the order they settle)
    {"done": "apps", "failed": 1}
    {"error": "0 store(s) and 1 app(s) did not start"}      # exit 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED
from rma_ray.waiting import WaitTimeout, wait_until

ON_HEAD = {LABEL_TIER: "head"}
REQUEST_TIMEOUT_S = 180.0  # Serve's end-to-end request limit, as rma_ray/serve_admin.py starts the proxy
# the Serve apps `up` waits for: the vision backend stays pending until a node it may run on joins
NOT_AWAITED = ("vision_backend_app",)
FAILED_STATES = ("DEPLOY_FAILED", "UNHEALTHY")
# The groups `up` applies alone first (embedded profile), until Serve has built their apps (at most
# HEAD_START_S), then with the others. The LLM's start is the longest chain of a warm `rma up` and mostly one
# thread: its build imports vLLM, then its replica imports it again and spawns vLLM's engine process, which
# imports it a third time. Put beside every other app's build and replicas, its build took ~40 s of a 2-core
# head and its replica ran on alone afterwards, one core idle; built first, its replica starts while the other
# apps build and start on the other core (bench.pool_down, bench/README.md).
HEAD_START = ("llm",)
HEAD_START_S = 60.0


def emit(**event: Any) -> None:
    print(json.dumps(event, default=str), flush=True)


# -- the data stores -----------------------------------------------------------------------------------------


def trusted_data_alive() -> bool:
    import ray

    for n in ray.nodes():
        labels = n.get("Labels") or {}
        if n.get("Alive") and labels.get(LABEL_TIER) == "data" and labels.get(LABEL_TRUSTED) == "true":
            return True
    return False


def placement(on: str) -> dict[str, str]:
    from deployments.stores.supervisor import TRUSTED_DATA

    if on == "data":
        return TRUSTED_DATA
    if on == "head":
        return ON_HEAD
    return TRUSTED_DATA if trusted_data_alive() else ON_HEAD


def pins_path() -> Path:
    """The store pins kept on the operator's machine (this process runs on the head): they outlive the GCS,
    which `rma down`/`rma up` or a core token rotation recreates empty."""
    from rma_ray.settings import Settings
    from rma_ray.storepins import PINS_FILE

    return Settings().data_dir / PINS_FILE


def seed_pins(stores: list[str]) -> None:
    """Put each kept pin back into the GCS where it holds none (a GCS that started again empty)."""
    from ray.experimental import internal_kv

    from deployments.stores.supervisor import NAMESPACE, pin_key, read_pin, seed_pin
    from rma_ray.storepins import load_pins

    kept = load_pins(pins_path())
    for store in stores:
        try:
            gcs = read_pin(store)
            pin = seed_pin(gcs, kept.get(store))
            if pin is not None and pin is not gcs:
                internal_kv._internal_kv_put(
                    pin_key(store), json.dumps(pin), overwrite=True, namespace=NAMESPACE
                )
        except Exception as exc:  # the GCS busy: the supervisor itself still refuses to start empty
            emit(store=store, warning=f"its kept pin was not put back into the GCS: {exc}"[:300])


def keep_pins(stores: list[str]) -> None:
    """Copy the GCS's pins (the supervisors record them) into the file on this machine."""
    from deployments.stores.supervisor import read_pin
    from rma_ray.storepins import save_pins

    try:
        pins = {s: p for s in stores if (p := read_pin(s)) is not None}
        if pins:
            save_pins(pins_path(), dict(pins))
    except Exception as exc:  # the GCS busy: the file keeps the last pins it had
        emit(warning=f"store pins not kept: {exc}"[:300])


def stores_up(stores: list[str], runtime: str, on: str, wait_s: float, ports: dict[str, int]) -> int:
    """One supervisor per store, on a trusted data donor when one is alive, else on the head (the embedded
    default); waits until each answers queries (or awaits a move's restore). One line per store; returns how many
    did not."""
    import ray

    from deployments.stores.supervisor import TRUSTED_DATA, ensure

    selector = placement(on)
    where = "a trusted data donor" if selector == TRUSTED_DATA else "the head"
    seed_pins(
        stores
    )  # before ensure(): a pinned store is created on its donor, not wherever the default says
    pending = {s: ensure(s, runtime=runtime, selector=selector, port=ports.get(s)) for s in stores}
    failed = 0

    def settle() -> bool:
        nonlocal failed
        for store, actor in list(pending.items()):
            try:
                st = ray.get(actor.status.remote(), timeout=5)
            except ray.exceptions.GetTimeoutError:
                continue  # not placed yet (no node matches) or still constructing
            except ray.exceptions.ActorUnavailableError:
                continue  # Ray is restarting the supervisor
            except ray.exceptions.RayError as exc:  # it died for good: say so now, not after wait_s
                pending.pop(store)
                failed += 1
                emit(store=store, status="failed", error=f"its supervisor died: {exc}"[:500], where=where)
                continue
            # a moved store awaiting its restore is settled: the move (or the operator) ends that, not `up`;
            # its line says which command does
            if st["status"] in ("ready", "failed", "awaiting-restore"):
                pending.pop(store)
                failed += st["status"] == "failed"
                emit(
                    store=store,
                    status=st["status"],
                    error=st["error"],
                    where=where,
                    node_ip=st["node_ip"],
                    port=st["port"],
                    ready_s=st["ready_s"],
                )
        return not pending

    try:
        try:
            wait_until(settle, timeout=wait_s, interval=0.5, what="the data stores")
        finally:
            keep_pins(stores)
    except WaitTimeout:
        reason = (
            f"no node matches {selector} (is a trusted data donor online?)"
            if selector == TRUSTED_DATA
            else "still starting"
        )
        for store in pending:
            failed += 1
            emit(store=store, status="pending", error=reason, where=where)
    return failed


def stores_status(stores: list[str]) -> None:
    import ray

    from deployments.stores.supervisor import NAMESPACE, actor_name

    for store in stores:
        try:
            actor = ray.get_actor(actor_name(store), namespace=NAMESPACE)
            st: dict[str, Any] = ray.get(actor.status.remote(), timeout=10)
        except ValueError:
            st = {"status": "absent"}
        except ray.exceptions.GetTimeoutError:
            st = {"status": "pending"}
        st.pop("labels", None)
        emit(store=store, **st)


def stores_down(stores: list[str], timeout: float) -> None:
    """Stop all stores at once (each flushes and exits), then remove their supervisors; the volumes stay."""
    import ray

    from deployments.stores.supervisor import NAMESPACE, actor_name

    keep_pins(stores)  # the GCS may start again empty: the pins stay on this machine
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
            emit(store=store, warning=f"clean stop failed: {exc}"[:300])
        ray.kill(actors[store], no_restart=True)
        emit(store=store, status="stopped")


# -- what each app needs before Serve builds it ---------------------------------------------------------


def prepare_llm() -> str | None:
    """Convert the embedded CPU model once (first start), here rather than in the replica's start-up, as the
    LLM's own deploy always has. None when the settings name another model."""
    from deployments.llm.config import LLMSettings

    settings = LLMSettings()
    if settings.resolved_tier() == "cpu" and (settings.model_source or settings.entry().source).startswith(
        "embedded:"
    ):
        from deployments.llm.prepare import prepare_embedded

        with contextlib.redirect_stdout(sys.stderr):  # its progress bar: stdout carries JSON lines only
            return str(prepare_embedded(settings.embedded_dir(), progress=True))
    return None


def check_vision() -> None:
    """An unknown or non-vision model: one line now, not a failed replica later."""
    from deployments.vision.config import VisionSettings

    settings = VisionSettings()
    if settings.backend == "vllm":
        settings.vllm_entry()


def migrate_services(services_args: dict[str, Any]) -> None:
    """The services' Alembic migrations before the app is deployed (a replica runs them too, on first use, if
    the Postgres store is not up yet)."""
    from deployments.gateway.refusal import Refusal
    from deployments.services.db import Database, store_endpoint
    from deployments.services.migrate import current
    from deployments.services.settings import ServicesSettings

    db = Database(ServicesSettings(**services_args).database, lambda store: store_endpoint(store, timeout=20))
    try:
        db.sessions()
    except Refusal as exc:
        if exc.code == "schema_migration_failed":
            raise RuntimeError(exc.message) from None
        emit(
            migration="services",
            schema=None,
            note=f"{exc.message}; the replicas migrate the schema when it is",
        )
        return
    assert db.engine is not None
    try:
        with db.engine.connect() as c:
            emit(migration="services", schema=current(c))
    finally:
        db.engine.dispose()


# -- the Serve apps, applied declaratively ---------------------------------------------------------------


class ConfigRefused(RuntimeError):
    """Serve answered a config PUT with a 4xx: something in the config is wrong."""


class Dashboard:
    """Serve's REST API on the Ray dashboard, with the cluster token (what KubeRay, `serve deploy` call)."""

    def __init__(self, url: str, token: str) -> None:
        import httpx

        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=60,
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )

    def apply(self, config: dict[str, Any]) -> None:
        """PUT the config: ConfigRefused when Serve answers 4xx (the config itself is wrong), RuntimeError for
        any other answer; httpx's errors pass (the dashboard did not answer: the config may have landed)."""
        r = self.http.put("/api/serve/applications/", json=config)
        if r.status_code != 200:
            cls = ConfigRefused if 400 <= r.status_code < 500 else RuntimeError
            raise cls(f"Serve refused the config ({r.status_code}): {r.text[-1000:]}")

    def applications(self) -> dict[str, Any]:
        r = self.http.get("/api/serve/applications/")
        r.raise_for_status()
        return r.json().get("applications") or {}

    def declared(self, leave_out: set[str]) -> list[dict[str, Any]]:
        """The app configs applied declaratively before (by an earlier `up`, KubeRay, `serve deploy`), but
        for `leave_out`: a new config keeps them, since Serve deletes declarative apps a config leaves out."""
        return [
            st["deployed_app_config"]
            for name, st in self.applications().items()
            if name not in leave_out and st.get("deployed_app_config")
        ]


def http_options(host: str, port: int) -> dict[str, Any]:
    """Serve's HTTP options as rma_ray/serve_admin.py started the proxy (a running Serve keeps its own; the
    same ones here spare Serve's warning about a change it cannot make)."""
    from rma_ray.serve_admin import haproxy_binary

    return {
        "host": "0.0.0.0" if haproxy_binary() else host,
        "port": port,
        "request_timeout_s": REQUEST_TIMEOUT_S,
    }


def app_states(apps: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """The states of `names` among Serve's `apps` once each is RUNNING or has failed; None while any is still
    on its way."""
    states = {n: apps.get(n, {}).get("status") for n in names}
    if all(s == "RUNNING" or s in FAILED_STATES for s in states.values()):
        return {n: apps[n] for n in names}
    return None


def built(apps: dict[str, Any], names: list[str]) -> bool:
    """Whether Serve has built each of `names` among its `apps` (its deployments are known), or failed it."""
    return all(
        apps.get(n, {}).get("deployments") or apps.get(n, {}).get("status") in FAILED_STATES for n in names
    )


def head_start(dash: Dashboard, names: list[str]) -> None:
    """Wait until Serve has built the apps `names` (HEAD_START), at most HEAD_START_S: the others go on after
    that whatever came of them (their own wait says)."""
    with contextlib.suppress(WaitTimeout):
        wait_until(
            lambda: built(dash.applications(), names),
            timeout=HEAD_START_S,
            interval=0.5,
            what=f"Serve to build {', '.join(names)}",
        )


def early_head_start(groups: list[str], dash: Dashboard, http: dict[str, Any]) -> dict[str, float]:
    """Apply the HEAD_START apps alone before the stores start, when they need no preparation (warm: the
    embedded LLM is converted already), so that Serve builds the LLM while the stores start: its chain (build,
    replica, engine) is the longest of a warm `rma up` and needs no store. Returns each group applied with the
    time of its PUT; anything that goes wrong here is left to `apps_up`, which prepares and applies every app as
    it always does (and says what failed). Not on a cold start: the model's conversion would hold the stores up."""
    from deployments import serve_config

    first = [g for g in groups if g in HEAD_START]
    if not first or len(first) == len(groups) or not llm_prepared():
        return {}
    try:
        specs = serve_config.group_apps(first, "embedded", None, None)
        names = {a.name for a in serve_config.group_apps(first, "gpu")}
        config = serve_config.apply_config(specs, http)
        config["applications"] = dash.declared(names) + config["applications"]
        dash.apply(config)
    except Exception:  # noqa: BLE001 - apps_up goes the usual way and reports what fails
        return {}
    now = time.monotonic()
    return {g: now for g in first}


def llm_prepared() -> bool:
    """Whether the LLM needs no preparation now: the embedded CPU model is converted already, or the settings
    name another model (nothing to convert)."""
    from deployments.llm.config import LLMSettings

    try:
        settings = LLMSettings()
        embedded = settings.resolved_tier() == "cpu" and (
            settings.model_source or settings.entry().source
        ).startswith("embedded:")
        if not embedded:
            return True
        from deployments.llm.prepare import is_prepared

        return is_prepared(settings.embedded_dir())
    except Exception:  # noqa: BLE001 - a bad setting: apps_up reports it
        return False


def apps_up(
    groups: list[str],
    dash: Dashboard,
    http: dict[str, Any],
    wait_s: float,
    edge: tuple[str, str] | None = None,
    early: dict[str, float] | None = None,
) -> int:
    """Prepare each of `groups` in turn (its RMA_* settings, the LLM's one-time conversion, the vision model's
    check, the services' migrations: a failure there fails that app only), apply the prepared ones (those of
    HEAD_START alone first, until Serve has built them, then all in one PUT), and wait for them together (each
    at most `wait_s` from its PUT): one line per app as it settles. Their replicas start side by side (a warm
    `rma up` waits for the slowest app, not for the sum of them). Should Serve refuse a config as a whole, the
    apps are applied one by one so that only the one it refuses fails.
    Returns how many did not run. `edge`: (name, coordinator URL) of the edge cluster whose apps these are (the
    edge profile). `early`: the HEAD_START groups `early_head_start` applied already, each with the time of its
    PUT (not applied alone again; Serve takes their same config in the full PUT as it is)."""
    from deployments import serve_config

    profile = "edge" if edge else "embedded"

    def specs_of(group: str) -> list[serve_config.AppSpec]:
        return serve_config.group_apps([group], profile, *(edge or (None, None)))

    names_of = {
        g: [
            a.name
            for a in (
                serve_config.group_apps([g], "gpu") if not edge else serve_config.edge_apps(*edge, env=False)
            )
            if not edge or a.builder in serve_config.EDGE_GROUPS[g]
        ]
        for g in groups
    }  # no env read
    others = dash.declared({n for names in names_of.values() for n in names})
    specs: dict[str, list[serve_config.AppSpec]] = {}
    prepared_s: dict[str, float] = {}  # each group's own preparation
    failed = 0

    def fail(group: str, status: str, error: str) -> None:
        nonlocal failed
        failed += 1
        emit(app=group, status=status, serve_apps=names_of[group], error=error)

    for group in groups:
        t0 = time.monotonic()
        try:
            specs[group] = specs_of(group)  # its RMA_* settings: a bad one fails this app only
            if group == "llm" and not edge:  # an edge's replicas convert it on their own nodes
                prepare_llm()
            elif group == "vision":
                check_vision()
            elif group == "services":
                migrate_services(next(a.args for a in specs[group] if a.builder == "services_app"))
        except Exception as exc:  # one line for the operator; details are in the Serve logs
            specs.pop(group, None)
            fail(group, "failed", f"{exc}"[-500:])
        prepared_s[group] = time.monotonic() - t0

    # each group's first PUT that Serve took (the early one's included)
    applied_at: dict[str, float] = {g: t for g, t in (early or {}).items() if g in specs}

    def apply(these: list[str], keep: list[dict[str, Any]] | None = None) -> None:
        """PUT `these` groups' apps with the declared ones that are not of `groups` (or `keep`)."""
        config = serve_config.apply_config([a for g in these for a in specs[g]], http)
        config["applications"] = (others if keep is None else keep) + config["applications"]
        dash.apply(config)
        for g in these:
            applied_at.setdefault(g, time.monotonic())

    ready = list(specs)
    if not ready:
        return failed
    awaited = {g: [a.name for a in specs[g] if a.builder not in NOT_AWAITED] for g in ready}
    first = [g for g in ready if g in HEAD_START] if not edge else []
    try:
        if first and len(first) < len(ready):
            if not all(g in applied_at for g in first):
                # every other declared app as it is (one of an earlier `up` stays up until the full PUT)
                apply(first, keep=dash.declared({n for g in first for n in names_of[g]}))
            head_start(dash, [n for g in first for n in awaited[g]])
        apply(ready)
    except ConfigRefused:  # refused as a whole: find the app Serve refuses
        ok = list(applied_at)  # in every PUT from now on: a config without them would delete them
        for group in ready:
            if group in ok:
                continue
            try:
                apply([*ok, group])
            except Exception as exc:
                fail(group, "failed", f"{exc}"[-500:])
            else:
                ok.append(group)
        ready = [g for g in ready if g in ok]
    except Exception as exc:  # no answer: whether the config landed is unknown; said for each app not in one
        for group in ready:  # that landed before
            if group not in applied_at:
                fail(group, "failed", f"{exc}"[-500:])
        ready = [g for g in ready if g in applied_at]
        if not ready:
            return failed
    pending = list(ready)

    def settle() -> bool:
        if not pending:
            return True
        apps = dash.applications()  # a dashboard error is retried until the wait ends
        for group in list(pending):
            states = app_states(apps, awaited[group])
            if states is None:
                continue
            pending.remove(group)
            bad = {n: s for n, s in states.items() if s.get("status") in FAILED_STATES}
            if bad:
                name, st = next(iter(bad.items()))
                message = (st.get("message") or "")[-500:]  # a traceback's end; the app's name kept
                fail(group, "failed", f"Serve app {name} is {st.get('status')}: {message}")
            else:
                # its own preparation, then from the PUT: not the other apps' preparations
                ready_s = round(prepared_s[group] + time.monotonic() - applied_at[group], 1)
                emit(app=group, status="running", serve_apps=names_of[group], ready_s=ready_s)
        return not pending

    try:
        wait_until(settle, timeout=wait_s, interval=1, what="the Serve apps")
    except WaitTimeout:
        for group in pending:
            fail(group, "timeout", f"Serve apps {', '.join(awaited[group])} not running after {wait_s:g} s")
    return failed


def apps_down(groups: list[str], edge: tuple[str, str] | None = None, timeout_s: float = 120.0) -> int:
    """Delete the Serve apps of `groups` (their replicas stop; vLLM's engine process goes with them), all at once,
    and wait for them together: one line per group, `deleted`, or `timeout` if any of its apps is still there
    after `timeout_s`; returns how many groups timed out. `edge`: (name, coordinator URL) of the edge cluster
    whose apps these are.

    At once: in Ray's HAProxy mode a deleted app's ingress replica stays reachable for 30 s
    (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S) and a blocking `serve.delete` waits that out, so one app after
    the other cost ~31 s each (a group has two or three apps) and gave up silently after Serve's own 60 s. A
    request that still reaches a front in that window may find its backend gone already: an app being deleted
    answers it with an error either way."""
    from ray import serve

    from deployments import serve_config
    from deployments.gateway.deploy import delete_apps

    names_of: dict[str, list[str]] = {}
    for group in groups:
        if edge:  # names only: no env read
            specs = [
                a
                for a in serve_config.edge_apps(*edge, env=False)
                if a.builder in serve_config.EDGE_GROUPS[group]
            ]
        else:
            specs = serve_config.group_apps([group], "gpu")
        names_of[group] = [spec.name for spec in reversed(specs)]  # a front before its backend
    try:
        delete_apps([n for names in names_of.values() for n in names], timeout_s=timeout_s)
        left: set[str] = set()
    except WaitTimeout:
        try:
            left = set(serve.status().applications)
        except (
            Exception
        ):  # Serve's controller went meanwhile: whether they are gone is unknown, said for each
            left = {n for names in names_of.values() for n in names}
    for group, names in names_of.items():
        still = [n for n in names if n in left]
        if still:
            emit(
                app=group,
                status="timeout",
                error=f"Serve apps {', '.join(still)} still there after {timeout_s:g} s",
            )
        else:
            emit(app=group, status="deleted")
    return sum(any(n in left for n in names) for names in names_of.values())


def apps_status(dash: Dashboard) -> None:
    for name, st in dash.applications().items():
        emit(
            serve_app=name,
            status=st.get("status"),
            route_prefix=st.get("route_prefix"),
            message=(st.get("message") or "")[-300:],
        )


# -- the command line -----------------------------------------------------------------------------------


def _names(value: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip() and s.strip() != "none"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)} or 'none'")
    return names


def _ports(items: list[str], known: list[str]) -> dict[str, int]:
    ports = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in known or not value.isdigit() or not 0 < int(value) < 65536:
            raise ValueError(f"--store-port {item!r}: use STORE=PORT with a store from {', '.join(known)}")
        ports[name] = int(value)
    return ports


def _token() -> str:
    import os

    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).read_text().strip() if path else os.environ.get("RAY_AUTH_TOKEN", "")


def parser() -> argparse.ArgumentParser:
    from deployments.serve_config import APP_GROUPS, EDGE_GROUPS
    from deployments.stores.kinds import KINDS

    ap = argparse.ArgumentParser(
        prog="python -m deployments", description="The pool's stores and Serve apps."
    )
    ap.add_argument("command", choices=["up", "down", "status", "prepare"])
    ap.add_argument("--address", help="GCS address of the pool's Ray head (default: RAY_ADDRESS)")
    ap.add_argument("--dashboard", help="the Ray dashboard's URL (default: the cluster's at --address)")
    ap.add_argument(
        "--stores",
        default=None,
        help=f"comma-separated ({', '.join(KINDS)}) or 'none' (default: all; none for --profile edge)",
    )
    ap.add_argument(
        "--profile",
        default="embedded",
        choices=["embedded", "edge"],
        help="embedded: the core cluster's apps (rma up); edge: an edge cluster's (--edge, --coordinator-url)",
    )
    ap.add_argument("--edge", help="--profile edge: the edge cluster's name")
    ap.add_argument(
        "--coordinator-url",
        default=os.environ.get("RMA_COORDINATOR_URL"),
        help="--profile edge: the coordinator that publishes the edge's keys (default: RMA_COORDINATOR_URL)",
    )
    ap.add_argument("--store-runtime", default="process", choices=["process", "docker"])
    ap.add_argument("--stores-on", default="auto", choices=["auto", "data", "head"])
    ap.add_argument(
        "--store-port",
        action="append",
        default=[],
        metavar="STORE=PORT",
        help="a store's port instead of its default (repeatable)",
    )
    ap.add_argument("--stores-wait", type=float, default=240.0, help="seconds to wait for the stores")
    ap.add_argument(
        "--apps",
        default="none",
        help=f"comma-separated ({', '.join(APP_GROUPS)}; --profile edge: {', '.join(EDGE_GROUPS)}) or 'none'",
    )
    ap.add_argument("--apps-wait", type=float, default=900.0, help="seconds to wait for each app")
    ap.add_argument("--serve-host", default="127.0.0.1", help="Serve's HTTP host (HAProxy binds all)")
    ap.add_argument("--serve-port", type=int, default=8000)
    return ap


def edge_of(a: argparse.Namespace) -> tuple[str, str] | None:
    """(edge name, coordinator URL) for --profile edge (ValueError with what to pass), else None."""
    if a.profile != "edge":
        if a.edge:
            raise ValueError("--edge is for --profile edge")
        return None
    if not a.edge or not a.coordinator_url:
        raise ValueError(
            "--profile edge needs --edge NAME and --coordinator-url URL (or RMA_COORDINATOR_URL)"
        )
    from deployments.serve_config import edge_apps

    edge_apps(a.edge, a.coordinator_url, set(), env=False)  # checks the name and the URL
    return a.edge, a.coordinator_url


def run(a: argparse.Namespace) -> int:
    from deployments.serve_config import APP_GROUPS, EDGE_GROUPS
    from deployments.stores.kinds import KINDS

    edge = edge_of(a)
    stores = _names(
        a.stores if a.stores is not None else ("none" if edge else ",".join(KINDS)), list(KINDS), "store"
    )
    if edge and stores:
        raise ValueError("an edge cluster holds no data stores: pass --stores none")
    groups = _names(a.apps, list(EDGE_GROUPS if edge else APP_GROUPS), "app")
    ports = _ports(a.store_port, list(KINDS))
    if a.command == "prepare":
        emit(model_dir=prepare_llm())
        return 0
    import ray

    from deployments.stores.supervisor import NAMESPACE

    ctx = ray.init(address=a.address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    try:
        if a.command == "down":
            try:
                bad_apps = apps_down(groups, edge=edge)
            finally:  # the stores stop whatever became of the apps
                stores_down(stores, a.stores_wait)
            if bad_apps:
                emit(error=f"{bad_apps} app(s) not deleted")
                return 1
            return 0
        url = a.dashboard or (f"http://{ctx.dashboard_url}" if ctx.dashboard_url else None)
        if url is None and (groups or a.command == "status"):
            raise ValueError(
                "this cluster has no Ray dashboard to apply Serve apps through; pass --dashboard"
            )
        dash = Dashboard(url, _token()) if url else None
        if a.command == "status":
            stores_status(stores)
            if dash is not None:
                apps_status(dash)
            return 0
        http = http_options(a.serve_host, a.serve_port)
        early = early_head_start(groups, dash, http) if dash and stores and not edge else {}
        bad_stores = stores_up(stores, a.store_runtime, a.stores_on, a.stores_wait, ports) if stores else 0
        emit(done="stores", failed=bad_stores)
        bad_apps = apps_up(groups, dash, http, a.apps_wait, edge, early) if dash else 0
        emit(done="apps", failed=bad_apps)
    finally:
        ray.shutdown()
    if bad_stores or bad_apps:
        emit(error=f"{bad_stores} store(s) and {bad_apps} app(s) did not start")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return run(a)
    except Exception as exc:  # one line for the operator; tracebacks are in the Ray and Serve logs
        emit(error=f"{a.command}: {exc}"[:1000])
        return 1


if __name__ == "__main__":
    sys.exit(main())
