"""The registry page in headless Chromium (Debian's chromium driven by Playwright): log in with the admin key,
see donors by tier with health dots, watch it refresh itself; a screenshot is saved to artifacts/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import ARTIFACTS
from tests.integration.conftest import Coordinator
from tests.integration.test_edge_admission import pool as pool  # a coordinator with two edges

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (`make test` installs it)"),
]

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page() -> Iterator:  # type: ignore[type-arg]
    """Headless Chromium (~1 s to start)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        yield page
        browser.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_registry_login_view_and_refresh(coordinator: Coordinator, page) -> None:  # type: ignore[no-untyped-def]
    svc = coordinator.join()
    coordinator.join(
        {
            "cpu_cores": 16,
            "ram_mb": 128887,
            "disk_free_gb": 64,
            "gpus": [{"name": "NVIDIA H200", "memory_mb": 143771}],
        }
    )
    coordinator.http.post(
        "/api/worker/heartbeat",
        headers={"Authorization": f"Bearer {svc['node_token']}"},
        json={"current_load": 0.42, "available_memory_mb": 20000},
    )

    page.goto(coordinator.url + "/registry")
    assert page.url.endswith("/registry/login")
    page.fill("#admin_key", "rma_admin_000000000000_" + "0" * 64)
    page.click("button[type=submit]")
    assert "unknown or revoked admin key" in page.inner_text(".error")

    page.fill("#admin_key", coordinator.admin_key)
    page.click("button[type=submit]")
    page.wait_for_url(coordinator.url + "/registry")
    cookie = next(c for c in page.context.cookies() if c["name"] == "rma_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert coordinator.admin_key not in cookie["value"]

    row = page.locator(f"tr[data-worker='{svc['worker_id']}']")
    assert row.get_attribute("data-status") == "healthy"
    assert "0.42" in row.inner_text()
    assert page.locator("article[data-tier='gpu'] h2").inner_text().endswith("0 / 1 online")
    assert page.locator("article[data-tier='service'] h2").inner_text().endswith("1 / 1 online")
    assert page.locator(f"tr[data-worker='{svc['worker_id']}'] .dot.healthy").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "registry.png"), full_page=True)

    # no heartbeat for 2.5 intervals (5 s here): the page refreshes itself and shows the donor offline
    page.wait_for_selector(f"tr[data-worker='{svc['worker_id']}'][data-status='offline']", timeout=20_000)
    # every resource came from the coordinator itself (no CDN)
    sources = page.eval_on_selector_all("script[src], link[href]", "els => els.map(e => e.src || e.href)")
    assert sources and all(s.startswith(coordinator.url) for s in sources)

    page.screenshot(path=str(ARTIFACTS / "registry-offline.png"), full_page=True)

    page.click("text=Log out")
    page.wait_for_url(coordinator.url + "/registry/login")
    page.goto(coordinator.url + "/registry")
    assert page.url.endswith("/registry/login")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_registry_shows_a_section_per_cluster(pool: Coordinator, page) -> None:  # type: ignore[no-untyped-def]
    """With edge clusters (issue 17): each cluster its own section, its donors, and an edge's Serve state."""
    edge_donor, core_donor = pool.join(), pool.join(trusted=True)
    page.goto(pool.url + "/registry/login")
    page.fill("#admin_key", pool.admin_key)
    page.click("button[type=submit]")
    page.wait_for_url(pool.url + "/registry")
    assert page.locator("section.cluster").evaluate_all("els => els.map(e => e.dataset.cluster)") == [
        "core",
        "edge",
        "west",
    ]
    edge_row = page.locator(f"section[data-cluster='edge'] tr[data-worker='{edge_donor['worker_id']}']")
    assert edge_row.get_attribute("data-cluster") == "edge"
    assert (
        page.locator(f"section[data-cluster='core'] tr[data-worker='{core_donor['worker_id']}']").count() == 1
    )
    assert (
        page.locator(f"section[data-cluster='core'] tr[data-worker='{edge_donor['worker_id']}']").count() == 0
    )
    # the edges' dashboards do not answer here: the page says the core serves their requests
    assert "not answering" in page.inner_text("section[data-cluster='edge'] .edge-apps")
    assert "rma invite create --edge west" in page.inner_text("section[data-cluster='west']")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "registry-clusters.png"), full_page=True)
