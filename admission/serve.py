"""Running the coordinator as a program: `rma admission serve` (admission/cli.py, which `admission` adds to
`rma` through the `rma.commands` entry points) and `rma up` (which runs that command) reach this, so that
`rma_ray` never imports `admission`."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from rma_ray.settings import Settings

out = Console(soft_wrap=True)


def serve(
    host: str, port: int, data_dir: Path | None, forwarded_allow_ips: str | None, quiet: bool = False
) -> None:
    """Migrate, bootstrap the first admin key (printed once), then serve until interrupted. Forwarding headers
    are the app's business (admission.proxy: trusted_proxies, client_ip_header), not uvicorn's."""
    import uvicorn

    from admission.main import build_state, create_app, prepare_database
    from rma_ray import logs

    logs.configure("coordinator")  # the rma.* loggers' lines reach stderr: coordinator.log under `rma up`
    if data_dir is not None:
        os.environ["RMA_DATA_DIR"] = str(data_dir)
    settings = Settings() if forwarded_allow_ips is None else Settings(trusted_proxies=forwarded_allow_ips)
    state = build_state(settings)
    minted = prepare_database(state)
    url = f"http://{host}:{port}"
    if not quiet:
        out.print(
            f"[bold]RMA coordinator[/] on {url}  "
            f"(database: {state.engine.url.render_as_string(hide_password=True)})"
        )
        out.print(f"  registry page: {url}/registry   OpenAPI (admin key): {url}/api/admin/openapi.json")
    if minted:
        out.print(f"  [bold yellow]admin key (shown once, keep it safe):[/] {minted}")
    uvicorn.run(
        create_app(state=state),
        host=host,
        port=port,
        proxy_headers=False,
        log_level="warning",
        access_log=False,
    )


def create_admin_key(name: str, data_dir: Path | None) -> str:
    from admission.db import session_scope
    from admission.main import build_state
    from admission.migrate import upgrade
    from admission.models import AdminKey
    from admission.services import keys

    if data_dir is not None:
        os.environ["RMA_DATA_DIR"] = str(data_dir)
    state = build_state(Settings())
    upgrade(state.engine)
    with session_scope(state.sessions) as session:
        created = keys.create(session, AdminKey, name, "system:cli", "")
    state.engine.dispose()
    return f"admin key {created.id} (shown once): {created.key}"
