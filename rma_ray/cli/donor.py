"""Donor commands: `rma join` (the agent in rma_ray/agent.py does the work), `rma leave`, `rma pause`,
`rma resume`, `rma caps`, `rma status`, `rma probe` and `rma version` (this machine's versions against the
head's: the install line runs `rma version --check`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.text import Text

from rma_ray import capabilities
from rma_ray.cli.common import DataDirOpt, JsonOpt, data_dir_of, err, fail, out, print_json, say, shown
from rma_ray.poolinfo import PoolInfo

commands = typer.Typer()  # merged into the root `rma` app by rma_ray/cli/__init__.py


def _read_caps_file(path: Path) -> capabilities.Capabilities:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read capabilities from {path}: {exc}")
    try:
        if isinstance(raw, dict) and ({"psutil", "psutil_equivalent", "nvml"} & raw.keys()):
            return capabilities.from_readings(raw)
        return capabilities.Capabilities.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"capabilities in {path}: {'.'.join(map(str, first['loc'])) or 'file'}: {first['msg']}")
    except (KeyError, TypeError, ValueError) as exc:
        fail(f"capabilities in {path}: not a probe reading ({exc!r}); `rma probe` prints one")


@commands.command("join")
def join(
    coordinator_url: Annotated[
        str, typer.Argument(help="the pool's coordinator, e.g. https://pool.example.org")
    ],
    token: Annotated[
        str | None,
        typer.Option(envvar="RMA_JOIN_TOKEN", help="the join token from the admin (first join only)"),
    ] = None,
    token_file: Annotated[Path | None, typer.Option(help="file holding the join token")] = None,
    name: Annotated[str | None, typer.Option(help="how this machine shows in the registry")] = None,
    cpus: Annotated[float | None, typer.Option(help="most CPUs Ray may use here", min=1)] = None,
    memory: Annotated[str | None, typer.Option(help="most memory Ray may use here, e.g. 8GB")] = None,
    gpus: Annotated[int | None, typer.Option(help="most GPUs Ray may use here", min=0)] = None,
    node_ip_address: Annotated[
        str | None,
        typer.Option(
            "--node-ip-address",
            help="address Ray advertises (default: the overlay address, or the one towards "
            "the head in a pool without an overlay)",
        ),
    ] = None,
    drain_deadline: Annotated[float, typer.Option(help="seconds to drain work when leaving", min=0)] = 30,
    capabilities_file: Annotated[
        Path | None, typer.Option(help="send these capabilities instead of probing")
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            help='lend the machine only in these windows, local time, e.g. "Mon-Fri 19:00-07:00; Sat-Sun"'
        ),
    ] = None,
    yield_when_busy: Annotated[
        bool, typer.Option(help="step aside while the machine's own (non-pool) CPU or GPU use is high")
    ] = False,
    busy_percent: Annotated[float, typer.Option(help="owner's use (%) that counts as busy")] = 50,
    busy_for: Annotated[float, typer.Option(help="seconds busy before stepping aside")] = 30,
    idle_percent: Annotated[float, typer.Option(help="owner's use (%) that counts as idle")] = 20,
    idle_for: Annotated[float, typer.Option(help="seconds idle before coming back")] = 120,
    overcommit_cpus: Annotated[
        bool, typer.Option(help="allow --cpus above this machine's cores (Ray's CPUs are logical)")
    ] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Donate this machine: register, start a Ray worker node in the assigned tier, stay until Ctrl-C.

    After a reboot or a restart (SIGTERM) it rejoins as the same donor; the join token is needed only once."""
    from rma_ray import logs
    from rma_ray import schedule as schedules
    from rma_ray.agent import Agent, AgentError, JoinOptions, caps_problem
    from rma_ray.busy import BusyPolicy

    plan = None
    if schedule is not None:
        try:
            plan = schedules.parse(schedule)
        except schedules.ScheduleError as exc:
            fail(f"--schedule: {exc}")
    policy = None
    if yield_when_busy:
        policy = BusyPolicy(busy_percent, busy_for, idle_percent, idle_for)
        if policy.problem():
            fail(str(policy.problem()))

    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read {token_file}: {exc.strerror}")
    if not coordinator_url.startswith(("http://", "https://")):
        fail(f"coordinator URL must start with http:// or https:// (got {coordinator_url!r})")
    memory_bytes = _memory(memory)
    d = data_dir_of(data_dir)
    caps = (
        _read_caps_file(capabilities_file)
        if capabilities_file
        else capabilities.probe(d if d.exists() else "/")
    )
    problem = caps_problem(caps, None, cpus, memory_bytes, gpus, overcommit_cpus=overcommit_cpus)
    if problem:
        fail(problem)
    import socket as _socket

    opts = JoinOptions(
        coordinator_url=coordinator_url.rstrip("/"),
        join_token=token or None,
        data_dir=d,
        name=name or _socket.gethostname(),
        capabilities=caps,
        node_ip=node_ip_address,
        cpus=cpus,
        memory_bytes=memory_bytes,
        gpus=gpus,
        drain_deadline_s=drain_deadline,
        schedule=plan,
        yield_when_busy=policy,
    )
    say(
        f"probed: {caps.cpu_cores} cores, {caps.ram_mb} MiB RAM, {caps.disk_free_gb:g} GiB free disk, "
        f"{len(caps.gpus)} GPU(s)"
        + (
            f", Ollama at {caps.ollama.url} with vision models "
            f"{', '.join(caps.ollama.vision_models) or 'none'}"
            if caps.ollama
            else ""
        )
    )
    logs.configure("agent")
    try:
        agent = Agent.join(opts, say)
    except AgentError as exc:
        fail(str(exc))
    agent.install_signal_handlers()
    say(f"in the pool; heartbeating every {agent.m.heartbeat_interval_s} s. Ctrl-C or `rma leave` to leave.")
    code = agent.run()
    if code:
        sys.exit(code)


def _memory(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(capabilities._BYTES.validate_python(text))
    except ValidationError:
        fail(f"cannot read the memory size {text!r}; use e.g. 8GB or 512MiB")


def _running_agent(data_dir: Path | None, what: str) -> tuple[Path, object]:
    from rma_ray import membership

    d = data_dir_of(data_dir)
    m = membership.load(d)
    if m is None:
        fail(f"this machine is not in a pool (no {membership.path(d)})")
    if not membership.alive(m.agent_pid, m.agent_started):
        fail(f"the agent of donor {m.worker_id} is not running; start it with `rma join` before {what}")
    return d, m


def _ask(data_dir: Path | None, what: str, request: Mapping[str, object], timeout: float) -> str:
    from rma_ray.agent import AgentError, ask_agent

    d, m = _running_agent(data_dir, what)
    try:
        now = ask_agent(m, d, dict(request), timeout)  # type: ignore[arg-type]
    except AgentError as exc:
        fail(str(exc))
    return str(now.extra.get("state", "active")).replace("_", " ")


@commands.command("pause")
def pause(
    data_dir: DataDirOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the agent to drain")] = 120,
) -> None:
    """Stop lending this machine for now: the agent drains and stops its Ray node, stays a member and shows as
    `paused` until `rma resume`."""
    state = _ask(data_dir, "pausing", {"op": "pause"}, timeout)
    out.print(f"paused: the Ray node is stopped; `rma resume` lends the machine again (state: {state})")


@commands.command("resume")
def resume(
    data_dir: DataDirOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the Ray node to start")] = 180,
) -> None:
    """Lend this machine again after `rma pause` (outside its --schedule, or while its owner is busy with
    --yield-when-busy, it stays aside until that ends)."""
    state = _ask(data_dir, "resuming", {"op": "resume"}, timeout)
    out.print(f"resumed (state: {state})")


@commands.command("caps")
def caps(
    cpus: Annotated[float | None, typer.Option(help="most CPUs Ray may use here", min=1)] = None,
    memory: Annotated[str | None, typer.Option(help="most memory Ray may use here, e.g. 8GB")] = None,
    gpus: Annotated[int | None, typer.Option(help="most GPUs Ray may use here", min=0)] = None,
    data_dir: DataDirOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the node to restart")] = 240,
) -> None:
    """Change what Ray may use on this machine without leaving: the agent drains and restarts its Ray node
    with the new limits, and keeps them across restarts."""
    from rma_ray import membership
    from rma_ray.agent import caps_problem

    memory_bytes = _memory(memory)
    if cpus is None and memory_bytes is None and gpus is None:
        fail("nothing to change: give --cpus, --memory or --gpus")
    d = data_dir_of(data_dir)
    m = membership.load(d)
    if m is None:
        fail(f"this machine is not in a pool (no {membership.path(d)})")
    problem = caps_problem(capabilities.probe(d), m.tier, cpus, memory_bytes, gpus)
    if problem:
        fail(problem)
    request = {"op": "caps", "cpus": cpus, "memory_bytes": memory_bytes, "gpus": gpus}
    if not membership.alive(m.agent_pid, m.agent_started):  # kept for the next `rma join`
        saved = dict(m.extra.get("caps") or {})
        saved.update({k: v for k, v in request.items() if k != "op" and v is not None})
        m.extra["caps"] = saved
        membership.save(d, m)
        out.print("saved; the agent is not running, so the next `rma join` starts the Ray node with them")
        return
    _ask(d, "changing limits", request, timeout)
    out.print("the Ray node runs with the new limits")


@commands.command("leave")
def leave(
    data_dir: DataDirOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the agent")] = 120,
) -> None:
    """Leave the pool: the running `rma join` drains, unregisters and stops its Ray node."""
    from rma_ray import agent, membership

    d = data_dir_of(data_dir)
    m = membership.load(d)
    if m is None:
        fail(f"this machine is not in a pool (no {membership.path(d)})")
    if membership.alive(m.agent_pid, m.agent_started):
        if not agent.ask_to_leave(m, timeout):
            fail(f"the agent (pid {m.agent_pid}) did not finish leaving within {timeout:.0f} s")
        out.print(f"left the pool (donor {m.worker_id})")
        return
    # the agent is gone (killed): unregister and stop what it left behind ourselves
    agent.leave_without_agent(m, d, lambda message: err.print(message))
    out.print(f"left the pool (donor {m.worker_id}; its agent was not running)")


@commands.command("status")
def status(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """This machine's membership: donor id, tier, labels, agent and Ray node, and what the coordinator
    says."""
    from rma_ray import agent, contribution, membership, poolinfo

    d = data_dir_of(data_dir)
    m = membership.load(d)
    if m is None:
        info = poolinfo.try_read(d)
        if not info.supervisor_running():
            fail(
                f"this machine is not in a pool (no {membership.path(d)}) and runs none (no `rma up` from {d}); "
                "join with `rma join URL --token T`"
            )
        view = head_view(info)
    else:
        view = agent.status_view(m)
        view.update(contribution.status_lines(m))  # what the coordinator's collector credits this donor with
    if as_json:
        return print_json(view)
    for k, v in view.items():
        out.print(Text.assemble(f"{k:<16} ", shown(v)), highlight=False)


def head_view(info: PoolInfo) -> dict[str, object]:
    """`rma status` on the head: the pool `rma up` runs from this data dir, one line per cluster."""

    def apps(a: dict[str, dict[str, object]] | None) -> str:
        return ", ".join(f"{k} {v.get('status')}" for k, v in sorted((a or {}).items())) or "none"

    view: dict[str, object] = {
        "role": "head (rma up)",
        "supervisor pid": info.supervisor_pid,
        "coordinator": info.coordinator_url,
        "Serve (clients)": info.serve_url,
        "cluster core": f"Ray {info.ray_address}, dashboard {info.ray_dashboard_url}, head pid {info.head_pid}",
        "core apps": apps(info.apps),
    }
    for name, e in sorted((info.edges or {}).items()):
        if e.error:
            state = f"error: {e.error}"
        elif e.head_pid:
            state = f"head pid {e.head_pid}"
        else:  # `rma up` starts an edge after the core's apps run, and the supervisor restarts a dead one
            state = "starting" if info.supervisor_running() else "stopped"
        view[f"cluster {name}"] = f"Ray {e.ray_address}, Serve {e.serve_url}, as {e.user}, {state}"
        view[f"{name} apps"] = apps(e.apps)
    return view


@commands.command("probe")
def probe(disk: Annotated[Path, typer.Option(help="measure free disk here")] = Path("/")) -> None:
    """Print this machine's capabilities as JSON (what `rma join` sends), and the tiers it qualifies for."""
    from rma_ray import tiers

    if not disk.exists():
        fail(f"{disk} does not exist")
    caps = capabilities.probe(disk)
    data = caps.model_dump()
    data["qualifies_for"] = [str(t) for t in tiers.eligible(caps)]
    print(json.dumps(data, indent=2))


@commands.command("version")
def version(
    check: Annotated[
        str | None,
        typer.Option(
            "--check",
            metavar="COORDINATOR_URL",
            help="compare with the pool's head (its /donor/versions.json); exit 1 on a mismatch",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print this machine's rma-pool, Ray and Python versions; with --check, whether they match the head's."""
    from rma_ray import dists
    from rma_ray.client import AdmissionClient

    here = dists.local_versions()
    head = None
    url = (check or "").rstrip("/")
    if check is not None:
        if not check.startswith(("http://", "https://")):
            fail(f"--check: the coordinator URL must start with http:// or https:// (got {check!r})")
        with AdmissionClient(check) as client:
            head = client.donor_versions()
    if as_json:
        print_json({"here": here.model_dump(), "head": head.model_dump() if head else None})
    else:
        say(f"rma-pool {here.pool} (revision {here.revision}), Ray {here.ray}, Python {here.python}")
    if head is None:
        return
    problem = dists.mismatch(here, head)
    if problem:
        fail(
            f"this machine does not match the pool's head: {problem}; "
            f"reinstall with `curl -fsSL {url}/donor/install.sh | sh`"
        )
    if not as_json:
        say(f"matches the head at {url}")
