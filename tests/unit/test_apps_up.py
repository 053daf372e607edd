"""`python -m deployments up`'s Serve apps (`deployments.__main__.apps_up`): the LLM alone until Serve has built
it, then every prepared app in one PUT, waited for together, one line per app as it settles; a preparation or a
config Serve refuses fails only its app. A stand-in for Serve's REST API (no Ray here) whose apps move to the
states each test scripts."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from deployments import __main__ as deployments_main
from deployments import serve_config
from rma_ray import waiting

HTTP = {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 180.0}


class Clock:
    """wait_until's clock and sleep: a poll costs no real time."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class Serve:
    """Serve's /api/serve/applications/ as the Dashboard class calls it. `becomes[name]`: (polls, status): an
    applied app reads DEPLOYING until it was polled that many times, then that status; an app not named there
    never settles. An app is built (its deployments listed) from its `builds[name]`th poll (default: the first).
    `refuse`: apps whose presence in a PUT makes Serve refuse the whole config. `declared`: the configs of apps
    applied before."""

    def __init__(
        self,
        becomes: dict[str, tuple[int, str]],
        refuse: tuple[str, ...] = (),
        silent: bool = False,
        builds: dict[str, int] | None = None,
        declared: list[dict[str, Any]] | None = None,
    ) -> None:
        self.becomes, self.refuse, self.silent = becomes, refuse, silent
        self.builds, self.declared_apps = builds or {}, declared or []
        self.puts: list[list[str]] = []
        self.polls: dict[str, int] = {}
        self.polls_at_put: list[dict[str, int]] = []  # how often each app was polled before each PUT

    def apply(self, config: dict[str, Any]) -> None:
        names = [a["name"] for a in config["applications"]]
        if self.silent:
            self.puts.append(names)  # it may well have landed
            raise httpx.ReadTimeout("timed out")
        if any(n in self.refuse for n in names):
            raise deployments_main.ConfigRefused(f"Serve refused the config (400): bad app {self.refuse[0]}")
        self.puts.append(names)
        self.polls_at_put.append(dict(self.polls))

    def applications(self) -> dict[str, Any]:
        out = {}
        for name in self.puts[-1] if self.puts else []:
            self.polls[name] = self.polls.get(name, 0) + 1
            polls, status = self.becomes.get(name, (10**9, "RUNNING"))
            st = status if self.polls[name] >= polls else "DEPLOYING"
            built = self.polls[name] >= self.builds.get(name, 1)
            out[name] = {
                "status": st,
                "message": f"{name} broke" if st == "DEPLOY_FAILED" else "",
                "deployments": {"d": {"status": "UPDATING"}} if built else {},
            }
        return out

    def declared(self, leave_out: set[str]) -> list[dict[str, Any]]:
        return [a for a in self.declared_apps if a["name"] not in leave_out]


def names(group: str) -> list[str]:
    return [a.name for a in serve_config.group_apps([group], "gpu")]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """apps_up with the preparations stubbed (no model conversion, no Postgres) and a clock that costs no
    time; returns (failed count, the JSON lines it printed)."""
    clock = Clock()
    prepared: list[str] = []
    monkeypatch.setattr(deployments_main, "prepare_llm", lambda: prepared.append("llm"))
    monkeypatch.setattr(deployments_main, "check_vision", lambda: prepared.append("vision"))
    monkeypatch.setattr(deployments_main, "migrate_services", lambda args: prepared.append("services"))
    monkeypatch.setattr(
        deployments_main,
        "wait_until",
        lambda pred, **kw: waiting.wait_until(pred, sleep=clock.sleep, clock=clock.now, **kw),
    )

    def go(groups: list[str], serve: Serve, wait_s: float = 600) -> tuple[int, list[dict[str, Any]]]:
        failed = deployments_main.apps_up(groups, serve, HTTP, wait_s)  # type: ignore[arg-type]
        return failed, [json.loads(x) for x in capsys.readouterr().out.splitlines()]

    go.prepared = prepared  # type: ignore[attr-defined]
    go.clock = clock  # type: ignore[attr-defined]
    return go


def test_every_app_goes_in_one_put_and_each_line_comes_as_it_settles(run: Any) -> None:
    llm, services, vision = names("llm"), names("services"), names("vision")
    serve = Serve(
        {
            **{n: (8, "RUNNING") for n in llm},
            **{n: (3, "RUNNING") for n in services},
            **{n: (1, "RUNNING") for n in vision},
        }
    )
    failed, lines = run(["llm", "services", "vision"], serve)
    assert failed == 0
    assert serve.puts == [llm, llm + services + vision], (
        "the LLM alone (built at the first poll), then one PUT with every app: their replicas start together"
    )
    assert run.prepared == ["llm", "services", "vision"]
    # in the order they settled, not the order asked
    assert [(x["app"], x["status"]) for x in lines] == [
        ("vision", "running"),
        ("services", "running"),
        ("llm", "running"),
    ]
    assert all(isinstance(x["ready_s"], float) for x in lines)


def test_the_vision_backend_is_not_waited_for(run: Any) -> None:
    """It stays pending until a node it may run on joins: the front's state is the group's."""
    front = [a.name for a in serve_config.group_apps(["vision"], "gpu") if a.builder == "vision_app"]
    failed, lines = run(["vision"], Serve({front[0]: (1, "RUNNING")}))
    assert failed == 0 and [(x["app"], x["status"]) for x in lines] == [("vision", "running")]


def test_a_failed_preparation_fails_only_its_app(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_vision() -> None:
        raise ValueError("unknown vision model 'nope'")

    monkeypatch.setattr(deployments_main, "check_vision", bad_vision)
    llm = names("llm")
    serve = Serve({n: (1, "RUNNING") for n in llm})
    failed, lines = run(["vision", "llm"], serve)
    assert failed == 1
    assert serve.puts == [llm], "the app whose preparation failed is never applied"
    assert lines[0] == {
        "app": "vision",
        "status": "failed",
        "serve_apps": names("vision"),
        "error": "unknown vision model 'nope'",
    }
    assert (lines[1]["app"], lines[1]["status"]) == ("llm", "running")


def test_a_config_serve_refuses_fails_only_the_app_it_refuses(run: Any) -> None:
    llm, services = names("llm"), names("services")
    serve = Serve({n: (1, "RUNNING") for n in llm + services}, refuse=(services[0],))
    failed, lines = run(["llm", "services"], serve)
    assert failed == 1
    assert serve.puts == [llm], "one by one after the whole was refused: the good app applied"
    by_app = {x["app"]: x for x in lines}
    assert by_app["services"]["status"] == "failed"
    assert f"bad app {services[0]}" in by_app["services"]["error"]
    assert by_app["llm"]["status"] == "running"


def test_a_failed_app_and_one_that_never_settles(run: Any) -> None:
    llm, services = names("llm"), names("services")
    serve = Serve({llm[0]: (2, "DEPLOY_FAILED"), llm[1]: (1, "RUNNING")})  # services: never settles
    failed, lines = run(["llm", "services"], serve, wait_s=30)
    assert failed == 2
    by_app = {x["app"]: x for x in lines}
    assert by_app["llm"]["status"] == "failed"
    assert by_app["llm"]["error"] == f"Serve app {llm[0]} is DEPLOY_FAILED: {llm[0]} broke"
    assert by_app["services"]["status"] == "timeout"
    assert by_app["services"]["error"] == f"Serve apps {', '.join(services)} not running after 30 s"


def test_a_put_that_got_no_answer_fails_every_app_without_a_partial_config(run: Any) -> None:
    """No answer is not a refusal: a PUT naming fewer apps would delete the ones the first may have started."""
    serve = Serve({}, silent=True)
    failed, lines = run(["llm", "services"], serve)
    assert failed == 2 and len(serve.puts) == 1
    assert [(x["app"], x["status"], x["error"]) for x in lines] == [
        ("llm", "failed", "timed out"),
        ("services", "failed", "timed out"),
    ]


def test_nothing_to_apply_makes_no_put(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad() -> None:
        raise ValueError("no such model")

    monkeypatch.setattr(deployments_main, "prepare_llm", bad)
    serve = Serve({})
    failed, lines = run(["llm"], serve)
    assert failed == 1 and serve.puts == [] and lines[0]["error"] == "no such model"


@pytest.mark.parametrize("left", [(), ("rma-vision",)])
def test_down_deletes_every_app_at_once_and_says_which_group_is_left(
    left: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deployments down`: one delete of all the groups' apps (a front before its backend), waited for together
    (one after the other, each waited out Ray's 30 s ingress drain); a group whose app is still there when the
    wait ends is a `timeout` line and counts as failed."""
    from types import SimpleNamespace

    import ray.serve

    from deployments.gateway import deploy
    from rma_ray.waiting import WaitTimeout

    deleted: list[tuple[list[str], float | None]] = []

    def delete_apps(apps: list[str], *, timeout_s: float | None = None) -> None:
        deleted.append((list(apps), timeout_s))
        if left:
            raise WaitTimeout("the apps to be deleted", 90, False)

    monkeypatch.setattr(deploy, "delete_apps", delete_apps)
    monkeypatch.setattr(ray.serve, "status", lambda: SimpleNamespace(applications={n: {} for n in left}))
    failed = deployments_main.apps_down(["llm", "vision"], timeout_s=90)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    llm = [a.name for a in reversed(serve_config.group_apps(["llm"], "gpu"))]
    vision = [a.name for a in reversed(serve_config.group_apps(["vision"], "gpu"))]
    assert deleted == [(llm + vision, 90)], "one delete of every app, fronts first, one wait"
    assert "rma-vision" in vision and vision.index("rma-vision") < vision.index("rma-vision-backend")
    assert failed == len(left)
    by_app = {x["app"]: x for x in lines}
    assert by_app["llm"] == {"app": "llm", "status": "deleted"}
    if left:
        assert (
            by_app["vision"]["status"] == "timeout"
            and "rma-vision still there after 90 s" in by_app["vision"]["error"]
        )
    else:
        assert by_app["vision"] == {"app": "vision", "status": "deleted"}


def test_down_says_timeout_for_every_app_when_serve_cannot_tell_what_is_left(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Serve's controller gone during the wait: no traceback (the stores still stop after it); every asked group
    is a `timeout` line, since whether its apps went is unknown."""
    import ray.serve

    from deployments.gateway import deploy
    from rma_ray.waiting import WaitTimeout

    def delete_apps(apps: list[str], *, timeout_s: float | None = None) -> None:
        raise WaitTimeout("the apps to be deleted", 90, False)

    def status() -> None:
        raise RuntimeError("the controller died")

    monkeypatch.setattr(deploy, "delete_apps", delete_apps)
    monkeypatch.setattr(ray.serve, "status", status)
    assert deployments_main.apps_down(["llm", "vision"], timeout_s=90) == 2
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["app"], x["status"]) for x in lines] == [("llm", "timeout"), ("vision", "timeout")]


def test_the_llm_is_built_alone_before_the_other_apps_are_applied(run: Any) -> None:
    """Its build (vLLM imported) and then its replica are the longest chain of a start: the other apps' builds
    and replicas start only once Serve has built it, so that they take the cores it leaves."""
    llm, services = names("llm"), names("services")
    serve = Serve(
        {n: (1, "RUNNING") for n in services} | {n: (9, "RUNNING") for n in llm}, builds={llm[0]: 5}
    )
    failed, lines = run(["services", "llm"], serve)
    assert failed == 0
    assert serve.puts == [llm, services + llm]
    assert serve.polls_at_put[1][llm[0]] == 5, "the full PUT came at the poll that saw it built"
    assert {x["app"] for x in lines} == {"llm", "services"}


def test_a_build_that_takes_too_long_holds_the_others_back_for_head_start_s_only(run: Any) -> None:
    llm, services = names("llm"), names("services")
    serve = Serve({n: (1, "RUNNING") for n in services + llm}, builds={llm[0]: 10**9})
    failed, lines = run(["llm", "services"], serve)
    assert serve.puts == [llm, llm + services]
    assert run.clock.t >= deployments_main.HEAD_START_S
    assert failed == 0 and [x["status"] for x in lines] == ["running", "running"]


def test_the_head_start_put_keeps_the_apps_declared_before(run: Any) -> None:
    """`deployments up` on a pool whose services already run: the LLM's own PUT leaves them as they are (a
    declarative config that left them out would delete them until the full PUT)."""
    llm, services = names("llm"), names("services")
    serve = Serve(
        {n: (1, "RUNNING") for n in services + llm},
        declared=[{"name": n, "import_path": "x:y"} for n in services + llm],
    )
    failed, _ = run(["llm", "services"], serve)
    assert failed == 0
    assert serve.puts == [services + llm, llm + services]


def test_a_config_refused_after_the_head_start_keeps_the_llm_in_every_put(run: Any) -> None:
    llm, services, vision = names("llm"), names("services"), names("vision")
    serve = Serve({n: (1, "RUNNING") for n in llm + services + vision}, refuse=(services[0],))
    failed, lines = run(["llm", "services", "vision"], serve)
    assert failed == 1
    assert serve.puts == [llm, llm + vision], "never a PUT without the LLM it already started"
    assert {x["app"]: x["status"] for x in lines} == {
        "services": "failed",
        "llm": "running",
        "vision": "running",
    }


def test_a_warm_start_applies_the_llm_before_the_stores_and_not_again_alone(
    run: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Warm (the model converted already): `early_head_start` PUTs the LLM alone, keeping the apps declared
    before, while the stores are still to start; `apps_up` then waits for its build and PUTs every app once,
    without a second PUT of the LLM alone, and times the LLM's ready_s from the early PUT."""
    monkeypatch.setattr(deployments_main, "llm_prepared", lambda: True)
    monkeypatch.setattr(deployments_main, "time", SimpleNamespace(monotonic=run.clock.now))
    llm, services = names("llm"), names("services")
    kept = [{"name": "someone-elses", "import_path": "x:y"}]
    serve = Serve({n: (1, "RUNNING") for n in services} | {n: (4, "RUNNING") for n in llm}, declared=kept)
    early = deployments_main.early_head_start(["llm", "services"], serve, HTTP)  # type: ignore[arg-type]
    assert list(early) == ["llm"] and serve.puts == [["someone-elses", *llm]]
    assert run.prepared == [], "nothing prepared before the stores: the model needed no conversion"
    run.clock.t += 30.0  # the stores' start
    failed = deployments_main.apps_up(["llm", "services"], serve, HTTP, 600, early=early)  # type: ignore[arg-type]
    assert failed == 0
    assert serve.puts == [["someone-elses", *llm], ["someone-elses", *llm, *services]]
    assert run.prepared == ["llm", "services"]
    ready = {x["app"]: x["ready_s"] for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert ready["llm"] >= 30.0 > ready["services"], ready


@pytest.mark.parametrize("why", ["cold", "alone", "refused"])
def test_no_early_put_on_a_cold_start_for_the_llm_alone_or_when_serve_refuses_it(
    run: Any, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """A cold start converts the model in `apps_up`, after the stores (a conversion before them would hold them
    up); the LLM alone needs no head start; a PUT Serve refuses is left to `apps_up`, which says what fails."""
    monkeypatch.setattr(deployments_main, "llm_prepared", lambda: why != "cold")
    llm, services = names("llm"), names("services")
    serve = Serve({n: (1, "RUNNING") for n in services + llm}, refuse=tuple(llm) if why == "refused" else ())
    groups = ["llm"] if why == "alone" else ["llm", "services"]
    assert deployments_main.early_head_start(groups, serve, HTTP) == {}  # type: ignore[arg-type]
    assert serve.puts == []


def test_llm_prepared_reads_the_conversion_marker(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.llm import prepare

    monkeypatch.setenv("RMA_LLM_MODEL_DIR", str(tmp_path / "model"))
    assert not deployments_main.llm_prepared()
    monkeypatch.setattr(prepare, "is_prepared", lambda target, gguf=None: target == tmp_path / "model")
    assert deployments_main.llm_prepared()
    monkeypatch.setenv("RMA_LLM_MODEL", "no-such-model")
    assert not deployments_main.llm_prepared(), "a bad setting: apps_up says what is wrong"
