"""The donor agent behind `rma join`: register, start the Ray worker node with the tier's labels, heartbeat,
obey drain/leave, restart the node if it dies, and leave cleanly (drain, unregister, stop) on Ctrl-C or
`rma leave`. SIGTERM (a reboot, `systemctl stop`, `docker stop`) stops the node but keeps the membership: the
next `rma join` rejoins as the same donor with its node credential, without the (spent) join token. Every
failure a donor can cause or meet is one line (AgentError)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rma_ray import membership, overlay, tiers, wire
from rma_ray.busy import BusyPolicy, BusyWatch, OwnerLoad
from rma_ray.capabilities import Capabilities
from rma_ray.client import AdmissionClient, AdmissionError
from rma_ray.credentials import fingerprint
from rma_ray.membership import Membership
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, NodeStartError, RayNode, drain_node, short_temp_dir
from rma_ray.schedule import Schedule

MB = 1024 * 1024
# `rma pause`, `rma resume` or `rma caps` -> the running agent (then SIGUSR1 wakes it)
CONTROL_FILE = "control.json"


class ControlRequest(BaseModel):
    """What `rma pause`, `rma resume` and `rma caps` ask of the running agent (control.json)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=64)
    op: Literal["pause", "resume", "caps"]
    cpus: float | None = Field(default=None, ge=1)
    memory_bytes: int | None = Field(default=None, ge=0)
    gpus: int | None = Field(default=None, ge=0)


class AgentError(Exception):
    """One line for the donor; the agent exits non-zero."""


@dataclass
class JoinOptions:
    coordinator_url: str
    join_token: str | None  # None: rejoin with the membership this machine kept
    data_dir: Path
    name: str
    capabilities: Capabilities
    node_ip: str | None = None
    cpus: float | None = None
    memory_bytes: int | None = None
    gpus: int | None = None
    drain_deadline_s: float = 30.0
    start_timeout_s: float = 120.0
    schedule: Schedule | None = None  # lend the machine only inside these windows
    yield_when_busy: BusyPolicy | None = None  # step aside while the owner uses the machine
    paused: bool = False  # a rejoin after `rma pause`: the pause holds until `rma resume`


def caps_problem(
    caps: Capabilities,
    tier: str | None,
    cpus: float | None,
    memory_bytes: int | None,
    gpus: int | None,
    overcommit_cpus: bool = False,
) -> str | None:
    """Why these limits cannot apply on this machine, as one line; None when they can. Only more than the
    machine has is refused (the tier comes from the probe of the whole machine, as at `rma join`), and a gpu
    tier donor's last GPU (Ray reporting none there would quarantine it). `overcommit_cpus` (`rma join
    --overcommit-cpus`): Ray's CPUs are logical, and a donor may knowingly promise more than its cores (I/O-bound
    work; test beds that fit several replicas on a 2-core machine)."""
    if cpus is not None and cpus > caps.cpu_cores and not overcommit_cpus:
        return (
            f"--cpus {cpus:g}: this machine has {caps.cpu_cores} cores "
            "(add --overcommit-cpus to promise Ray more logical CPUs than cores)"
        )
    if memory_bytes is not None:
        if memory_bytes > caps.ram_mb * MB:
            return f"--memory {memory_bytes // MB} MiB: this machine has {caps.ram_mb} MiB"
        if memory_bytes < 256 * MB:
            return "--memory: Ray needs at least 256MiB"
    if gpus is not None and gpus > len(caps.gpus):
        return f"--gpus {gpus}: this machine has {len(caps.gpus)} GPU(s)"
    if tier == str(tiers.Tier.GPU) and gpus == 0:
        return "--gpus 0: this donor is in the gpu tier; leave the pool to stop lending its GPU"
    return None


Say = Callable[[str], None]


class Agent:
    def __init__(self, data_dir: Path, member: Membership, node: RayNode, say: Say) -> None:
        self.data_dir, self.m, self.node, self.say = data_dir, member, node, say
        self.client = AdmissionClient(member.coordinator_url, timeout=10)
        self.stop_event = threading.Event()
        self.exit_reason = "left the pool"
        self.drained = False
        self.unregister_on_exit = True
        self.keep_membership = False
        self.spoke: overlay.Spoke | None = None
        # a signal (SIGUSR1 from `rma pause`, `rma resume` or `rma caps`, or a leave) ends a wait
        self.wake = threading.Event()
        self.paused: str | None = None  # a wire.PAUSED_STATES while the Ray node is stopped on purpose
        self.manual_pause = False  # `rma pause` (until `rma resume`)
        self.schedule: Schedule | None = None
        self.busy: BusyWatch | None = None
        self.owner_load: OwnerLoad | None = None
        self.capabilities: Capabilities | None = None
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)

    # -- joining ---------------------------------------------------------------------------------------

    @classmethod
    def join(cls, opts: JoinOptions, say: Say) -> Agent:
        """Join for the first time with the join token, or, when this machine kept its membership (a reboot, a
        crash, a restarted unit or container), rejoin as the same donor with its node token."""
        existing = membership.load(opts.data_dir)
        if existing and membership.alive(existing.agent_pid, existing.agent_started):
            raise AgentError(
                f"this machine is already in the pool as {existing.worker_id} (agent pid "
                f"{existing.agent_pid}); run `rma leave` first"
            )
        if existing is not None and existing.coordinator_url.rstrip("/") != opts.coordinator_url.rstrip("/"):
            raise AgentError(
                f"this machine is donor {existing.worker_id} of {existing.coordinator_url}; "
                f"run `rma leave` before joining another pool"
            )
        key_file = opts.data_dir / "overlay" / "private.key"
        if existing is not None:
            saved = (existing.extra or {}).get("caps") or {}  # `rma caps` outlives a restart
            opts.cpus = opts.cpus if opts.cpus is not None else saved.get("cpus")
            opts.memory_bytes = (
                opts.memory_bytes if opts.memory_bytes is not None else saved.get("memory_bytes")
            )
            opts.gpus = opts.gpus if opts.gpus is not None else saved.get("gpus")
            opts.paused = bool((existing.extra or {}).get("manual_pause"))
            cls.clean_up_after(existing, opts.data_dir, say)
            reg = cls.rejoin_registry(opts, existing, key_file, say)
            if reg is not None:
                return cls.start(opts, reg, existing.node_token, key_file, say, first=False)
        if not opts.join_token:
            raise AgentError(
                "no join token: pass --token, --token-file or RMA_JOIN_TOKEN (ask the pool "
                "admin for an invite)"
            )
        # a new WireGuard key for every first join (a key once used never joins again); the private half
        # stays here
        key_file.unlink(missing_ok=True)
        public_key = cls.overlay_key(key_file)
        client = AdmissionClient(opts.coordinator_url, timeout=30)
        try:
            reg = client.register(opts.join_token, opts.name, opts.capabilities, public_key)
        except AdmissionError as exc:
            raise AgentError(f"registration refused: {exc}") from None
        finally:
            client.close()
        say(
            f"admitted as [bold]{reg.tier}[/] tier donor {reg.worker_id} "
            f"({'trusted' if reg.trusted else 'untrusted'})"
        )
        return cls.start(opts, reg, reg.node_token, key_file, say, first=True)

    @staticmethod
    def overlay_key(key_file: Path) -> str:
        try:
            return overlay.load_or_create_key(key_file)
        except (OSError, overlay.OverlayError) as exc:
            raise AgentError(f"could not make this machine's WireGuard key: {exc}") from None

    @staticmethod
    def clean_up_after(m: Membership, data_dir: Path, say: Say) -> None:
        """What an agent that died (SIGKILL, a crash, a power cut) left running: its Ray node and its overlay
        interface. Only processes that are still the recorded ones are stopped."""
        from rma_ray.raynode import stop_process_tree

        if membership.alive(m.ray_pid, m.extra.get("ray_started")):
            say(f"stopping the Ray node (pid {m.ray_pid}) the previous agent left running …")
            stop_process_tree(m.ray_pid or 0, grace=5)
        ov = (m.extra or {}).get("overlay")
        if ov:
            try:
                overlay.Firewall(ov["interface"], []).remove()
                overlay.Interface(ov["interface"], "", data_dir / "overlay" / "private.key").down()
            except overlay.OverlayError as exc:
                say(f"[yellow]overlay clean-up:[/] {exc}")
        shutil.rmtree(short_temp_dir(m.worker_id), ignore_errors=True)

    @classmethod
    def rejoin_registry(
        cls, opts: JoinOptions, m: Membership, key_file: Path, say: Say
    ) -> wire.RejoinResponse | None:
        """The registry's side of a rejoin. None: this donor left the pool (a new join token may still admit
        it); refusals the donor cannot fix (revoked, quarantined, hardware) are one line."""
        public_key = cls.overlay_key(key_file)  # the old key when it survived; a new one when it is gone
        say(f"rejoining as donor {m.worker_id} with its node credential …")
        try:
            with AdmissionClient(opts.coordinator_url, timeout=30) as client:
                reg = client.rejoin(m.node_token, opts.name, opts.capabilities, public_key)
        except AdmissionError as exc:
            if exc.code in ("worker_left", "worker_revoked", "invalid_node_token"):
                membership.clear(opts.data_dir)
                key_file.unlink(missing_ok=True)
                if exc.code == "worker_left" and opts.join_token:
                    say(f"[yellow]{exc}[/]; joining with the join token instead")
                    return None
            if exc.status is None:  # not an answer: the coordinator is down or unreachable; a restart retries
                raise AgentError(f"could not rejoin as donor {m.worker_id}: {exc}") from None
            raise AgentError(f"rejoin refused: {exc}") from None
        say(
            f"rejoined as [bold]{reg.tier}[/] tier donor {reg.worker_id} "
            f"({'trusted' if reg.trusted else 'untrusted'})"
        )
        return reg

    @classmethod
    def start(
        cls,
        opts: JoinOptions,
        reg: wire.RejoinResponse,
        node_token: str,
        key_file: Path,
        say: Say,
        first: bool,
    ) -> Agent:
        """Overlay, then the Ray node. A first join that fails here is aborted, which gives the invite use
        back; a rejoin that fails keeps its membership, so the next start (systemd, docker) tries again."""

        def give_up(why: str) -> AgentError:
            if first:
                try:
                    with AdmissionClient(opts.coordinator_url, timeout=10) as c:
                        refunded = c.abort(node_token)
                except AdmissionError as exc:
                    say(f"[yellow]could not end the registration:[/] {exc}")
                else:
                    why += "; the join token was not used up" if refunded else ""
                membership.clear(opts.data_dir)
                key_file.unlink(missing_ok=True)
            return AgentError(why)

        if reg.ray is None:  # an older coordinator; a current one refuses before spending the token
            raise give_up(
                "the coordinator runs without a Ray head (`rma admission serve` alone); "
                "ask the admin for a pool started with `rma up`"
            )
        token_file = opts.data_dir / "cluster_token"
        membership.write_private(token_file, (reg.ray.auth_token or "") + "\n")
        address = reg.ray.address
        try:
            spoke = cls.overlay_up(reg, key_file, say)
        except AgentError as exc:
            raise give_up(str(exc)) from None
        node_ip = opts.node_ip or (spoke.address if spoke else local_ip_towards(address.rsplit(":", 1)[0]))
        # once agent_pid is saved, `rma pause`, `rma resume` or `rma caps` may send SIGUSR1, whose default
        # action ends the process; starting the node takes minutes, so ignore it until
        # install_signal_handlers: the request waits in control.json, and run's loop reads that first
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        m = Membership(
            coordinator_url=opts.coordinator_url,
            worker_id=reg.worker_id,
            node_token=node_token,
            tier=str(reg.tier),
            labels=reg.labels,
            trusted=reg.trusted,
            heartbeat_interval_s=reg.heartbeat_interval_s,
            ray_address=address,
            node_ip=node_ip,
            agent_pid=os.getpid(),
            agent_started=psutil.Process().create_time(),
            extra={
                "cluster": fingerprint(reg.ray.auth_token),
                "overlay": ({"interface": spoke.name, "address": spoke.address} if spoke else None),
                "caps": {"cpus": opts.cpus, "memory_bytes": opts.memory_bytes, "gpus": opts.gpus},
                "schedule": opts.schedule.text if opts.schedule else None,
                "yield_when_busy": opts.yield_when_busy is not None,
                "state": "active",
                "manual_pause": opts.paused,
            },
        )
        membership.save(opts.data_dir, m)
        spec = NodeSpec(
            node_ip=node_ip,
            token_file=token_file,
            temp_dir=short_temp_dir(reg.worker_id),
            labels=reg.labels,
            address=address,
            num_cpus=opts.cpus,
            num_gpus=opts.gpus,
            memory_bytes=opts.memory_bytes,
            drain_timeout_s=opts.drain_deadline_s,
            # store supervisors and Serve replicas on this node find membership.json through it
            env={"RMA_DATA_DIR": str(opts.data_dir)},
            # on the overlay every Ray port is pinned, so the firewall can keep them off other
            # addresses
            extra_args=spoke.ports.argv(head=False) if spoke else [],
        )
        agent = cls(opts.data_dir, m, RayNode(spec, opts.data_dir / "logs" / "ray-node.log"), say)
        agent.spoke, agent.schedule, agent.capabilities = spoke, opts.schedule, opts.capabilities
        if opts.yield_when_busy is not None:
            agent.busy = BusyWatch(opts.yield_when_busy)
            agent.owner_load = OwnerLoad(lambda: agent.node.pid if agent.node.running() else None)
        agent.manual_pause = opts.paused
        off_schedule = opts.schedule is not None and not opts.schedule.in_window(agent.now())
        if not first and (opts.paused or off_schedule):  # a first join still proves its node can start
            say(
                "not starting the Ray node now: "
                + ("paused (`rma resume` lends the machine again)" if opts.paused else "outside the schedule")
            )
            return agent
        try:
            try:
                agent.start_node(opts.start_timeout_s)
            except NodeStartError as exc:
                if "overloaded" not in str(exc):
                    raise
                say(f"[yellow]{exc}[/]; trying once more")
                agent.node.kill()
                agent.start_node(opts.start_timeout_s)
        except NodeStartError as exc:
            agent.node.kill()
            shutil.rmtree(spec.temp_dir, ignore_errors=True)
            if spoke:
                spoke.down()
            if not first:  # still a member: the next start rejoins (and finds no process of this one)
                m.agent_pid = m.ray_pid = None
                membership.save(opts.data_dir, m)
            raise give_up(f"could not start the Ray node: {exc}") from None
        return agent

    @staticmethod
    def overlay_up(reg: wire.RejoinResponse, key_file: Path, say: Say) -> overlay.Spoke | None:
        """Bring up this donor's end of the pool's overlay, when the pool runs one; None in direct mode."""
        ov = reg.overlay
        if ov is None:
            key_file.unlink(missing_ok=True)
            return None
        spoke = overlay.Spoke(
            name=overlay.interface_name(reg.worker_id),
            key_file=key_file,
            address=ov.address,
            prefix=ov.prefix,
            hub_public_key=ov.hub_public_key,
            hub_endpoint=ov.hub_endpoint,
            hub_address=ov.hub_address,
            keepalive_s=ov.keepalive_s,
            mtu=ov.mtu,
        )
        say(
            f"joining the pool's overlay as {spoke.address} (hub {spoke.hub_endpoint}, "
            f"interface {spoke.name}) …"
        )
        try:
            spoke.up()
        except overlay.OverlayError as exc:
            raise AgentError(f"could not join the pool's overlay: {exc}") from None
        return spoke

    def start_node(self, timeout: float) -> None:
        self.say(f"starting the Ray node on {self.m.node_ip} (head {self.m.ray_address}) …")
        self.node.start()
        node_id = self.node.wait_started(timeout)
        self.m.ray_pid, self.m.ray_node_id = self.node.pid, node_id
        try:  # so that a later agent stops this very process, never a PID reused after a reboot
            self.m.extra["ray_started"] = psutil.Process(self.node.pid or 0).create_time()
        except psutil.Error:
            pass
        membership.save(self.data_dir, self.m)
        self.guard_ports()
        self.say(
            f"Ray node {node_id[:12]} is up with labels "
            + ", ".join(f"{k}={v}" for k, v in self.m.labels.items())
        )

    # -- running ---------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            # Ctrl-C and `rma leave` (SIGINT) leave the pool; SIGTERM is what a reboot, `systemctl stop` or
            # `docker stop` sends: the node stops, the membership stays, and the next start rejoins
            if signum == signal.SIGTERM:
                self.exit_reason, self.unregister_on_exit = "stopped (SIGTERM); `rma join` rejoins", False
                self.keep_membership = True
            else:
                self.exit_reason = "left the pool (" + signal.Signals(signum).name + ")"
            self.stop_event.set()
            self.wake.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGUSR1, lambda _s, _f: self.wake.set())  # a request in control.json

    def guard_ports(self) -> None:
        """Firewall any port Ray opened outside the pinned ones (on the overlay only)."""
        if self.spoke is None:
            return
        try:
            self.spoke.firewall.cover(overlay.listening_ports(self.node.pids()))
        except overlay.OverlayError as exc:
            self.say(f"[yellow]firewall:[/] {exc}")

    def beat(self) -> str:
        vm = psutil.virtual_memory()
        load = os.getloadavg()[0] / (psutil.cpu_count() or 1)
        status = self.paused or (
            "draining" if self.drained else "healthy" if self.node.running() else "degraded"
        )
        resume_at = None
        if self.paused == "off_schedule" and self.schedule is not None:
            resume_at = self.schedule.next_change(self.now())
        beat = wire.HeartbeatRequest(
            status=status,
            current_load=round(load, 3),
            available_memory_mb=vm.available // MB,
            ray_node_id=None if self.paused else self.m.ray_node_id,
            resume_at=resume_at,
        )
        reply = self.client.heartbeat(self.m.node_token, beat)
        if reply.cluster and reply.cluster != self.m.extra.get("cluster"):
            if self.paused:  # stepped aside: the node stays stopped; `resume` starts it with the new token
                self.say("the pool rotated its cluster token: fetched it for when the node comes back")
                self.refresh_ray()
            else:
                self.say("the pool rotated its cluster token: rejoining the new cluster")
                self.rejoin_cluster()
        return reply.action

    def refresh_ray(self) -> bool:
        """Fetch the head's address and current cluster token with this donor's node token."""
        try:
            info = self.client.ray_info(self.m.node_token)
        except AdmissionError as exc:
            self.say(f"[yellow]could not fetch the cluster token:[/] {exc}")
            return False
        token = info.auth_token or ""
        membership.write_private(self.node.spec.token_file, token + "\n")
        self.m.ray_address, self.m.extra["cluster"] = info.address, fingerprint(token)
        self.node.spec.address = info.address
        membership.save(self.data_dir, self.m)
        return True

    def rejoin_cluster(self) -> None:
        if not self.refresh_ray():
            return
        self.node.stop(timeout=10)  # the old cluster is gone: nothing to drain
        try:
            self.start_node(120)
            self.drained = False
        except NodeStartError as exc:
            self.say(f"[yellow]rejoin failed:[/] {exc}; will retry")

    def run(self) -> int:
        """Heartbeat until told to leave, revoked, or interrupted. Returns the process exit code."""
        interval = max(1, self.m.heartbeat_interval_s)
        restarts, unreachable_since = 0, None
        code = 0
        while not self.stop_event.is_set():
            self.step_aside()
            if self.paused:
                try:  # the Ray node is stopped on purpose: heartbeat the state, so the registry shows it
                    action = self.beat()
                except AdmissionError as exc:
                    if exc.code == "worker_revoked":
                        self.say("[red]this donor was revoked by the pool admin (or has left)[/]")
                        self.exit_reason, self.unregister_on_exit, code = "revoked", False, 1
                        break
                    action = "none"
                if action == "leave":
                    self.exit_reason = "asked to leave by the coordinator"
                    break
                self.pause_wait(interval)
                continue
            self.node.track()
            self.guard_ports()
            if not self.node.running():
                failure = self.node.failure()
                if failure and "refused the cluster token" in failure and not self.refresh_ray():
                    self.say(f"[red]{failure}[/]; leaving")
                    code = 1
                    break
                try:  # a revoked donor (cut off the overlay: its node died of it) must not restart
                    self.beat()
                except AdmissionError as exc:
                    if exc.code == "worker_revoked":
                        self.say("[red]this donor was revoked by the pool admin; stopping[/]")
                        self.exit_reason, self.unregister_on_exit, code = "revoked", False, 1
                        break
                restarts += 1
                delay = min(60, 2 ** min(restarts, 6))
                self.say(
                    f"[yellow]the Ray node stopped[/] ({failure or 'no reason in its log'}); "
                    f"restarting in {delay} s (restart {restarts})"
                )
                if self.stop_event.wait(delay):
                    break
                try:
                    self.node.kill_leftovers()
                    self.start_node(120)
                    self.drained = False
                except NodeStartError as exc:
                    self.say(f"[yellow]restart failed:[/] {exc}")
                continue
            try:
                action = self.beat()
                if unreachable_since is not None:
                    self.say("coordinator reachable again")
                unreachable_since = None
            except AdmissionError as exc:
                if exc.code == "worker_revoked":
                    self.say(
                        "[red]this donor was revoked by the pool admin (or has left); stopping the node[/]"
                    )
                    self.exit_reason, self.unregister_on_exit, code = "revoked", False, 1
                    break
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    self.say(f"[yellow]heartbeat failed:[/] {exc}; the node keeps serving, retrying")
                action = "none"
            if action == "leave":
                self.exit_reason = "asked to leave by the coordinator"
                break
            if action == "drain" and not self.drained:
                self.drain("the pool admin asked this donor to drain")
            elif action == "none" and self.drained:
                self.say("resuming: restarting the Ray node to take work again")
                self.node.stop(timeout=15)
                self.drained = False
                continue
            self.pause_wait(interval)
        self.leave()
        return code

    # -- stepping aside: `rma pause`, --schedule, --yield-when-busy, `rma caps` ------------------------------

    def pause_wait(self, interval: float) -> None:
        """Sleep until the next heartbeat, a request (`rma pause`, `rma resume`, `rma caps`), a leave, or the
        schedule's next change, whichever comes first."""
        timeout = float(interval)
        if self.schedule is not None:
            change = self.schedule.next_change(self.now())
            if change is not None:
                timeout = min(timeout, max(0.5, (change - self.now()).total_seconds()))
        self.wake.wait(timeout)
        self.wake.clear()

    def wanted_state(self) -> str | None:
        """Why the Ray node should be stopped now (a wire.PAUSED_STATES), or None to lend the machine."""
        yielding = False
        if self.busy is not None and self.owner_load is not None:
            yielding = self.busy.update(self.owner_load.sample())
        if self.manual_pause:
            return "paused"
        if self.schedule is not None and not self.schedule.in_window(self.now()):
            return "off_schedule"
        return "yielding" if yielding else None

    def step_aside(self) -> None:
        """Apply what control.json asks, then stop or start the Ray node as the pause, the schedule and the
        owner's use want; record the state (and the answer to the request) in membership.json."""
        rid, request, error = self.read_control()
        if request is not None:
            if request.op in ("pause", "resume"):
                self.manual_pause = self.m.extra["manual_pause"] = request.op == "pause"
            else:
                error = self.set_caps(request.cpus, request.memory_bytes, request.gpus)
        want = self.wanted_state()
        if want and not self.paused:
            self.pause(want)
        elif want and want != self.paused:
            self.paused = want
            self.say(f"still stepped aside, now {want.replace('_', ' ')}")
        elif not want and self.paused:
            self.resume()
        if rid is not None or self.m.extra.get("state") != (self.paused or "active"):
            self.m.extra["state"] = self.paused or "active"
            if rid is not None:
                self.m.extra["control"] = {"id": rid, "error": error}
            membership.save(self.data_dir, self.m)

    def read_control(self) -> tuple[str | None, ControlRequest | None, str | None]:
        """The pending request's id, the request, and why it cannot be done when it is malformed (the asker
        reads that answer under its id); (None, None, None) when nothing was asked."""
        file = self.data_dir / CONTROL_FILE
        try:
            text = file.read_text()
        except FileNotFoundError:
            return None, None, None
        except OSError as exc:
            self.say(f"[yellow]ignoring an unreadable {file}:[/] {exc}")
            return None, None, None
        finally:
            file.unlink(missing_ok=True)
        try:
            request = ControlRequest.model_validate_json(text)
        except ValidationError as exc:
            try:
                raw = json.loads(text)
            except ValueError:
                raw = None
            first = exc.errors()[0]
            rid = str(raw.get("id") or "")[:64] if isinstance(raw, dict) else ""
            return rid, None, f"bad request: {'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}"
        return request.id, request, None

    def pause(self, state: str) -> None:
        """Drain and stop the Ray node the way a leave does, but keep the membership and keep heartbeating."""
        why = {"paused": "paused by the donor", "off_schedule": "outside the donor's schedule"}.get(
            state, "the machine's owner is using it"
        )
        self.paused = state
        self.say(
            f"stepping aside ({why}): draining the Ray node (up to {self.node.spec.drain_timeout_s:.0f} s) …"
        )
        try:  # the registry shows the state before Ray reports the node gone, so it is never taken as offline
            self.beat()
        except AdmissionError as exc:
            self.say(f"[yellow]heartbeat failed:[/] {exc}")
        self.node.stop()
        self.drained = False
        self.m.ray_pid = self.m.ray_node_id = None
        self.say(f"{state.replace('_', ' ')}: the Ray node is stopped; still a member of the pool")

    def resume(self) -> None:
        self.say("coming back: starting the Ray node again …")
        try:
            self.node.kill_leftovers()
            self.start_node(120)
        except NodeStartError as exc:  # the usual restart path (run's loop) tries again
            self.say(f"[yellow]could not start the Ray node:[/] {exc}")
        self.paused = None

    def set_caps(self, cpus: float | None, memory_bytes: int | None, gpus: int | None) -> str | None:
        """New limits for Ray: drain, restart the node with them (at once, or on resume); kept in
        membership.json so a restart keeps them."""
        spec = self.node.spec
        cpus = spec.num_cpus if cpus is None else cpus
        memory_bytes = spec.memory_bytes if memory_bytes is None else memory_bytes
        gpus = spec.num_gpus if gpus is None else gpus
        if self.capabilities is not None:
            problem = caps_problem(self.capabilities, self.m.tier, cpus, memory_bytes, gpus)
            if problem:
                return problem
        old = spec.num_cpus, spec.memory_bytes, spec.num_gpus
        spec.num_cpus, spec.memory_bytes, spec.num_gpus = cpus, memory_bytes, gpus
        if not self.paused:
            self.say("new limits: draining the Ray node to restart it with them …")
            self.node.stop()
            try:
                self.node.kill_leftovers()
                self.start_node(120)
            except NodeStartError as exc:  # not applied, so not kept: run's loop restarts with the old ones
                spec.num_cpus, spec.memory_bytes, spec.num_gpus = old
                return f"the Ray node did not restart with the new limits: {exc}"
        self.m.extra["caps"] = {"cpus": cpus, "memory_bytes": memory_bytes, "gpus": gpus}
        membership.save(self.data_dir, self.m)
        if self.paused:
            self.say("new limits saved; they apply when the Ray node comes back")
        return None

    def drain(self, why: str) -> None:
        try:
            accepted = drain_node(
                self.m.ray_address or "",
                self.node.spec.token_file,
                self.m.ray_node_id or "",
                why,
                self.node.spec.drain_timeout_s,
            )
        except Exception as exc:  # the GCS may be gone; the node is stopped on leave anyway
            self.say(f"[yellow]drain request failed:[/] {exc}")
            return
        self.drained = accepted
        self.say(
            "draining: no new work will be placed here"
            if accepted
            else "[yellow]the head refused the drain[/]"
        )

    def unregister(self) -> None:
        unregister(self.client, self.m.node_token, self.say)

    def leave(self) -> None:
        if self.exit_reason == "revoked":  # cut off: there is no head left to drain to
            self.say("stopping the Ray node …")
            self.node.stop(timeout=5)
        else:
            self.say(f"leaving: draining the Ray node (up to {self.node.spec.drain_timeout_s:.0f} s) …")
            self.node.stop()
        if self.spoke is not None:
            self.spoke.down()
            if not self.keep_membership:
                self.spoke.key_file.unlink(missing_ok=True)
        shutil.rmtree(self.node.spec.temp_dir, ignore_errors=True)  # Ray's sockets and session logs
        if self.unregister_on_exit:
            self.unregister()
        if self.keep_membership:
            self.m.agent_pid = self.m.ray_pid = None
            membership.save(self.data_dir, self.m)
        else:
            membership.clear(self.data_dir)
        self.client.close()
        self.say(f"done: {self.exit_reason}; no Ray process of this donor is left")


def unregister(client: AdmissionClient, node_token: str, say: Say) -> None:
    """Leave the registry; a donor the admin revoked has nothing left to unregister."""
    try:
        client.unregister(node_token)
    except AdmissionError as exc:
        if exc.code != "worker_revoked":
            say(f"[yellow]could not unregister:[/] {exc}")


def ask_to_leave(m: Membership, timeout: float) -> bool:
    """`rma leave` while the agent runs: a SIGINT, like Ctrl-C (SIGTERM would keep the membership); False when
    it did not finish leaving within `timeout` s."""
    agent = psutil.Process(m.agent_pid)
    agent.send_signal(signal.SIGINT)
    try:
        agent.wait(timeout)
    except psutil.TimeoutExpired:
        return False
    return True


def ask_agent(m: Membership, data_dir: Path, request: dict[str, Any], timeout: float) -> Membership:
    """`rma pause`, `rma resume` or `rma caps` while the agent runs: the request goes in control.json (mode
    0600, beside the membership, so only who may read that may ask), SIGUSR1 wakes the agent, and its answer
    comes back in membership.json under the request's id. AgentError: refused, or no answer in `timeout` s."""
    from rma_ray.waiting import GiveUp, WaitTimeout, wait_until

    rid = secrets.token_hex(8)
    body = ControlRequest(id=rid, **request).model_dump_json()
    membership.write_private(data_dir / CONTROL_FILE, body)
    try:
        psutil.Process(m.agent_pid).send_signal(signal.SIGUSR1)
    except psutil.Error as exc:
        (data_dir / CONTROL_FILE).unlink(missing_ok=True)
        raise AgentError(f"cannot reach the agent (pid {m.agent_pid}): {exc}") from None

    def answered() -> Membership | None:
        now = membership.load(data_dir)
        if now is not None and (now.extra.get("control") or {}).get("id") == rid:
            return now
        if not membership.alive(m.agent_pid, m.agent_started):
            raise GiveUp(f"the agent (pid {m.agent_pid}) exited")
        return None

    try:
        now = wait_until(answered, timeout=timeout, interval=0.3, what="the agent's answer")
    except GiveUp as exc:
        raise AgentError(str(exc)) from None
    except WaitTimeout:
        raise AgentError(
            f"the agent (pid {m.agent_pid}) did not answer within {timeout:.0f} s; see `rma status`"
        ) from None
    assert now is not None  # wait_until returns only a truthy answer
    error = now.extra["control"].get("error")
    if error:
        raise AgentError(error)
    return now


def leave_without_agent(m: Membership, data_dir: Path, warn: Say) -> None:
    """`rma leave` when the agent is gone (killed): stop what it left behind (its Ray node, its overlay
    interface and firewall, which outlive it), unregister, and forget the membership."""
    Agent.clean_up_after(m, data_dir, warn)
    (data_dir / "overlay" / "private.key").unlink(missing_ok=True)
    with AdmissionClient(m.coordinator_url) as client:
        unregister(client, m.node_token, warn)
    membership.clear(data_dir)


def status_view(m: Membership) -> dict[str, Any]:
    """`rma status`: this machine's membership, its processes and overlay, and what the coordinator says."""
    view: dict[str, Any] = {
        "worker_id": m.worker_id,
        "tier": m.tier,
        "trusted": m.trusted,
        "labels": m.labels,
        "coordinator_url": m.coordinator_url,
        "node_ip": m.node_ip,
        "ray_address": m.ray_address,
        "ray_node_id": m.ray_node_id,
        "agent_running": membership.alive(m.agent_pid, m.agent_started),
        "ray_node_running": membership.alive(m.ray_pid, (m.extra or {}).get("ray_started")),
        "state": (m.extra or {}).get("state", "active"),
    }
    extra = m.extra or {}
    if extra.get("schedule"):
        view["schedule"] = extra["schedule"]
    if extra.get("yield_when_busy"):
        view["yield_when_busy"] = True
    caps = {k: v for k, v in (extra.get("caps") or {}).items() if v is not None}
    if caps:
        view["caps"] = caps
    ov = (m.extra or {}).get("overlay")
    if ov:
        try:
            shake = max((p.latest_handshake for p in overlay.peers_of(ov["interface"])), default=0)
            view["overlay"] = {
                "address": ov["address"],
                "interface": ov["interface"],
                "last_handshake_s": round(time.time() - shake) if shake else None,
            }
        except overlay.OverlayError as exc:
            view["overlay"] = {"address": ov["address"], "interface": ov["interface"], "error": str(exc)}
    with AdmissionClient(m.coordinator_url, m.node_token, timeout=5) as client:
        try:
            me = client.me().model_dump(mode="json")
            view.update(registry_status=me["status"], action=me["action"], last_seen_at=me["last_seen_at"])
            if me.get("resume_at"):
                view["next_window"] = me["resume_at"]
        except AdmissionError as exc:
            view["registry_status"] = f"unknown ({exc})"
    return view
