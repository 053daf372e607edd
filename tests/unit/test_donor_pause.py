"""Pause, resume, schedule windows and live caps in the agent, with a fake Ray node and a fake coordinator
(unit tests never start Ray) and an injected clock: the node is stopped and started, the heartbeat says why,
and membership.json answers the CLI. Plus the CLI's one-line refusals."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner

from rma_ray import cli, membership, wire
from rma_ray.agent import CONTROL_FILE, Agent, caps_problem
from rma_ray.busy import BusyPolicy, BusyWatch
from rma_ray.capabilities import Capabilities
from rma_ray.credentials import fingerprint
from rma_ray.membership import Membership
from rma_ray.raynode import NodeSpec, NodeStartError
from rma_ray.schedule import parse

runner = CliRunner()


class FakeNode:
    def __init__(self, spec: NodeSpec) -> None:
        self.spec, self.up, self.starts, self.stops = spec, True, 0, 0

    pid = os.getpid()

    def running(self) -> bool:
        return self.up

    def start(self) -> None:
        self.up, self.starts = True, self.starts + 1

    def wait_started(self, timeout: float) -> str:
        return f"{self.starts:056x}"

    def stop(self, timeout: float | None = None) -> None:
        self.up, self.stops = False, self.stops + 1

    def kill_leftovers(self) -> None:
        pass

    def track(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []


class FakeCoordinator:
    def __init__(self) -> None:
        self.beats: list[wire.HeartbeatRequest] = []

    def heartbeat(self, token: str, beat: wire.HeartbeatRequest) -> wire.HeartbeatResponse:
        self.beats.append(beat)
        return wire.HeartbeatResponse(action="none")


CAPS = Capabilities(cpu_cores=8, ram_mb=16_000, disk_free_gb=100, gpus=[])


def make_agent(tmp_path: Path) -> tuple[Agent, FakeNode, FakeCoordinator]:
    m = Membership(
        coordinator_url="http://coordinator.invalid",
        worker_id="w1",
        node_token="rma_node_w1_secret",
        tier="service",
        labels={},
        trusted=True,
        heartbeat_interval_s=5,
        ray_address="10.0.0.1:6380",
        node_ip="10.0.0.2",
        extra={"state": "active"},
    )
    membership.save(tmp_path, m)
    spec = NodeSpec(node_ip="10.0.0.2", token_file=tmp_path / "t", temp_dir=tmp_path / "ray", labels={})
    node = FakeNode(spec)
    agent = Agent(tmp_path, m, node, lambda _msg: None)  # type: ignore[arg-type]
    coordinator = FakeCoordinator()
    agent.client = coordinator  # type: ignore[assignment]
    agent.capabilities = CAPS
    return agent, node, coordinator


def request(tmp_path: Path, **body: Any) -> None:
    (tmp_path / CONTROL_FILE).write_text(json.dumps({"id": "r1", **body}))


def test_pause_and_resume_through_the_control_file(tmp_path: Path) -> None:
    agent, node, coordinator = make_agent(tmp_path)
    request(tmp_path, op="pause")
    agent.step_aside()
    assert agent.paused == "paused" and not node.running() and node.stops == 1
    assert coordinator.beats[-1].status == "paused"  # said before the node went, so never seen offline
    saved = membership.load(tmp_path)
    assert saved is not None and saved.extra["state"] == "paused"
    assert saved.extra["control"] == {"id": "r1", "error": None} and saved.ray_pid is None
    assert saved.extra["manual_pause"]  # kept for a restart
    assert not (tmp_path / CONTROL_FILE).exists()
    agent.step_aside()  # nothing asked: stays paused
    assert node.stops == 1 and node.starts == 0
    request(tmp_path, op="resume")
    agent.step_aside()
    assert agent.paused is None and node.running() and node.starts == 1
    saved = membership.load(tmp_path)
    assert saved is not None and saved.extra["state"] == "active" and saved.ray_node_id
    assert not saved.extra["manual_pause"]


def test_a_schedule_window_drains_and_returns(tmp_path: Path) -> None:
    agent, node, coordinator = make_agent(tmp_path)
    berlin = ZoneInfo("Europe/Berlin")
    agent.schedule = parse("Mon-Fri 19:00-07:00; Sat-Sun", berlin)
    clock = [datetime(2026, 12, 7, 20, 0, tzinfo=berlin)]  # Monday evening: inside
    agent.now = lambda: clock[0]
    agent.step_aside()
    assert agent.paused is None and node.stops == 0
    clock[0] = datetime(2026, 12, 8, 7, 0, tzinfo=berlin)  # Tuesday 07:00: the window ends
    agent.step_aside()
    assert agent.paused == "off_schedule" and not node.running()
    agent.beat()
    assert coordinator.beats[-1].status == "off_schedule"
    assert coordinator.beats[-1].resume_at == datetime(2026, 12, 8, 19, 0, tzinfo=berlin)
    assert coordinator.beats[-1].ray_node_id is None
    clock[0] = datetime(2026, 12, 8, 19, 0, tzinfo=berlin)  # the next window starts
    agent.step_aside()
    assert agent.paused is None and node.running() and node.starts == 1
    agent.beat()
    assert coordinator.beats[-1].status == "healthy" and coordinator.beats[-1].resume_at is None


def test_a_manual_pause_outranks_the_schedule_and_yielding(tmp_path: Path) -> None:
    agent, node, _ = make_agent(tmp_path)
    t = [0.0]
    agent.busy = BusyWatch(
        BusyPolicy(busy_percent=50, busy_for_s=10, idle_percent=20, idle_for_s=10), lambda: t[0]
    )
    samples = iter([90.0, 90.0, 5.0, 5.0])
    agent.owner_load = type("Load", (), {"sample": lambda self: next(samples)})()  # type: ignore[assignment]
    agent.step_aside()
    t[0] = 10
    agent.step_aside()
    assert agent.paused == "yielding" and node.stops == 1
    request(tmp_path, op="pause")
    t[0] = 20
    agent.step_aside()  # the owner went idle, but the donor paused: still aside, now as `paused`
    assert agent.paused == "paused" and node.stops == 1
    request(tmp_path, op="resume")
    t[0] = 30
    agent.step_aside()
    assert agent.paused is None and node.starts == 1


def test_caps_restart_the_node_and_are_kept(tmp_path: Path) -> None:
    agent, node, _ = make_agent(tmp_path)
    request(tmp_path, op="caps", cpus=2, memory_bytes=8 * 1024**3)
    agent.step_aside()
    assert node.stops == 1 and node.starts == 1 and node.spec.num_cpus == 2
    saved = membership.load(tmp_path)
    assert saved is not None and saved.extra["caps"]["cpus"] == 2
    request(tmp_path, op="caps", cpus=64)  # more than the machine has: refused, nothing restarted
    agent.step_aside()
    saved = membership.load(tmp_path)
    assert saved is not None and "this machine has 8 cores" in saved.extra["control"]["error"]
    assert node.stops == 1 and node.spec.num_cpus == 2
    request(tmp_path, op="caps", cpus="lots")  # malformed: answered, not obeyed, and the agent lives on
    agent.step_aside()
    saved = membership.load(tmp_path)
    assert saved is not None and saved.extra["control"]["error"].startswith("bad request: cpus:")
    assert node.stops == 1


@pytest.mark.parametrize(
    ("tier", "limits", "says"),
    [
        (None, {"cpus": 16}, "this machine has 8 cores"),
        (None, {"memory_bytes": 64 * 1024**3}, "this machine has 16000 MiB"),
        (None, {"gpus": 1}, "this machine has 0 GPU(s)"),
        ("gpu", {"gpus": 0}, "in the gpu tier"),
    ],
)
def test_caps_problems(tier: str | None, limits: dict[str, Any], says: str) -> None:
    full = {"cpus": None, "memory_bytes": None, "gpus": None, **limits}
    assert says in (caps_problem(CAPS, tier, **full) or "")


def test_more_cpus_than_cores_only_when_the_donor_says_so() -> None:
    assert "--overcommit-cpus" in (caps_problem(CAPS, None, 16, None, None) or "")
    assert caps_problem(CAPS, None, 16, None, None, overcommit_cpus=True) is None
    # memory and GPUs are not logical: no overcommit for them
    assert caps_problem(CAPS, None, 16, 64 * 1024**3, None, overcommit_cpus=True)


def test_cli_refusals_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["join", "http://x", "--schedule", "Mon-Fro 19:00-07:00"], "--schedule: cannot read the days"),
        (["join", "http://x", "--memory", "8XB"], "cannot read the memory size '8XB'"),
        (
            ["join", "http://x", "--yield-when-busy", "--idle-percent", "80"],
            "--idle-percent must not be above",
        ),
        (["caps", "--memory", "8XB", "--data-dir", str(tmp_path)], "cannot read the memory size '8XB'"),
        (["caps", "--data-dir", str(tmp_path)], "nothing to change"),
        (["pause", "--data-dir", str(tmp_path)], "this machine is not in a pool"),
    ]
    for argv, says in cases:
        result = runner.invoke(cli.app, argv)
        assert isinstance(result.exception, cli.CliError), (argv, result.output)
        assert says in str(result.exception) and "\n" not in str(result.exception), argv


def test_caps_without_a_running_agent_are_kept_for_the_next_join(tmp_path: Path) -> None:
    make_agent(tmp_path)  # a membership whose agent is not running
    result = runner.invoke(cli.app, ["caps", "--cpus", "4096", "--data-dir", str(tmp_path)])
    assert isinstance(result.exception, cli.CliError) and "this machine has" in str(result.exception)
    result = runner.invoke(cli.app, ["caps", "--cpus", "2", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = membership.load(tmp_path)
    assert saved is not None and saved.extra["caps"] == {"cpus": 2.0}
    result = runner.invoke(cli.app, ["pause", "--data-dir", str(tmp_path)])
    assert "is not running" in str(result.exception)


def test_a_paused_donor_whose_beats_stop_is_offline() -> None:
    from admission.models import Worker
    from admission.services.workers import derive_status

    now = datetime(2026, 12, 7, 12, 0)
    w = Worker(created_at=now, heartbeat_status="paused", ray_alive=False, ray_seen_at=now)
    assert derive_status(w, now, 5, now) == "paused"  # Ray saw the node go: meant, not offline
    assert derive_status(w, now, 5, now, beat_status="healthy") == "offline"
    assert derive_status(w, now - timedelta(seconds=13), 5, now) == "offline"  # its agent is gone too


def test_a_pause_outlives_a_restart(tmp_path: Path) -> None:
    from rma_ray.agent import JoinOptions

    reg = wire.RejoinResponse(
        worker_id="w1",
        tier="service",
        tier_number=2,
        trusted=True,
        labels={},
        heartbeat_interval_s=5,
        ray=wire.RayInfo(address="127.0.0.1:6380", auth_token="t"),
    )
    opts = JoinOptions("http://coordinator.invalid", None, tmp_path, "box", CAPS, paused=True)
    agent = Agent.start(opts, reg, "rma_node_w1_secret", tmp_path / "key", lambda _m: None, first=False)
    assert agent.manual_pause and not agent.node.running() and agent.node.proc is None
    coordinator = FakeCoordinator()
    agent.client = coordinator  # type: ignore[assignment]
    agent.step_aside()
    assert agent.paused == "paused" and coordinator.beats[-1].status == "paused"
    saved = membership.load(tmp_path)
    assert saved is not None and saved.extra["manual_pause"] and saved.extra["state"] == "paused"


def test_donors_list_shows_the_next_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from rma_ray.cli import admin
    from tests.unit.test_cli_units import _FakeAdmin

    row = {"id": "w1", "name": "box", "tier": "service", "trusted": False, "current_load": None}
    rows = [
        {**row, "status": "off_schedule", "resume_at": "2026-12-08T18:00:00Z", "last_seen_at": None},
        {**row, "id": "w2", "status": "paused", "last_seen_at": None},
    ]
    monkeypatch.setattr(admin, "admin_client", lambda *_: _FakeAdmin(rows))
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(cli.app, ["donors", "list"])
    assert result.exit_code == 0, result.output
    assert "off_schedule (next window 2026-12-08T18:00:00Z)" in result.stdout and "paused" in result.stdout


class RotatingCoordinator(FakeCoordinator):
    """A coordinator after `rma rotate-cluster-token`: the beats name a new cluster, ray_info hands it out."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token, self.infos = token, 0

    def heartbeat(self, token: str, beat: wire.HeartbeatRequest) -> wire.HeartbeatResponse:
        self.beats.append(beat)
        return wire.HeartbeatResponse(action="none", cluster=fingerprint(self.token))

    def ray_info(self, token: str) -> wire.RayInfo:
        self.infos += 1
        return wire.RayInfo(address="10.0.0.1:6390", auth_token=self.token)


@pytest.mark.parametrize("how", ["pause", "beat_while_paused"])
def test_a_token_rotation_does_not_undo_a_pause(tmp_path: Path, how: str) -> None:
    agent, node, _ = make_agent(tmp_path)
    if how == "beat_while_paused":
        request(tmp_path, op="pause")
        agent.step_aside()
    coordinator = RotatingCoordinator("new-cluster-token")
    agent.client = coordinator  # type: ignore[assignment]
    if how == "pause":  # the beat inside pause() already names the new cluster
        request(tmp_path, op="pause")
        agent.step_aside()
    else:
        agent.beat()
    assert agent.paused == "paused" and not node.running() and node.starts == 0
    assert coordinator.beats[-1].status == "paused" and coordinator.beats[-1].ray_node_id is None
    assert coordinator.infos == 1 and node.spec.token_file.read_text() == "new-cluster-token\n"
    assert node.spec.address == "10.0.0.1:6390"
    agent.beat()  # the fingerprint is now current: nothing fetched again
    assert coordinator.infos == 1 and node.starts == 0
    request(tmp_path, op="resume")
    agent.step_aside()  # comes back on the new cluster
    assert agent.paused is None and node.running() and node.starts == 1


def test_a_token_rotation_rejoins_an_active_donor(tmp_path: Path) -> None:
    agent, node, _ = make_agent(tmp_path)
    coordinator = RotatingCoordinator("new-cluster-token")
    agent.client = coordinator  # type: ignore[assignment]
    agent.beat()
    assert node.stops == 1 and node.starts == 1 and node.running()


def test_caps_that_fail_to_restart_are_not_kept(tmp_path: Path) -> None:
    agent, node, _ = make_agent(tmp_path)
    before = node.spec.num_cpus, node.spec.memory_bytes, node.spec.num_gpus

    def fail(timeout: float) -> str:
        raise NodeStartError("raylet exited")

    node.wait_started = fail  # type: ignore[method-assign]
    request(tmp_path, op="caps", cpus=2)
    agent.step_aside()
    saved = membership.load(tmp_path)
    assert saved is not None and "did not restart with the new limits" in saved.extra["control"]["error"]
    assert "caps" not in saved.extra  # not applied, so not kept for the next start either
    assert (node.spec.num_cpus, node.spec.memory_bytes, node.spec.num_gpus) == before


def test_a_request_during_start_up_does_not_kill_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rma pause` signals the pid in membership.json: SIGUSR1 must be handled before that pid is saved."""
    import signal

    from rma_ray import agent as agent_module
    from rma_ray.agent import JoinOptions

    reg = wire.RejoinResponse(
        worker_id="w1",
        tier="service",
        tier_number=2,
        trusted=True,
        labels={},
        heartbeat_interval_s=5,
        ray=wire.RayInfo(address="127.0.0.1:6380", auth_token="t"),
    )
    seen: list[object] = []
    real_save = membership.save

    def save(data_dir: Path, m: Membership) -> None:
        if m.agent_pid == os.getpid():
            seen.append(signal.getsignal(signal.SIGUSR1))
        real_save(data_dir, m)

    monkeypatch.setattr(agent_module.membership, "save", save)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        opts = JoinOptions("http://coordinator.invalid", None, tmp_path, "box", CAPS, paused=True)
        agent = Agent.start(opts, reg, "rma_node_w1_secret", tmp_path / "key", lambda _m: None, first=False)
        assert seen and signal.SIG_DFL not in seen  # never published while SIGUSR1 would end the process
        os.kill(os.getpid(), signal.SIGUSR1)  # `rma pause` now: the agent lives on
        request(tmp_path, op="resume")
        agent.client = FakeCoordinator()  # type: ignore[assignment]
        agent.node = FakeNode(agent.node.spec)  # type: ignore[assignment]
        agent.step_aside()  # the loop's first step answers the request sent during start-up
        saved = membership.load(tmp_path)
        assert saved is not None and saved.extra["control"] == {"id": "r1", "error": None}
        agent.install_signal_handlers()
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
