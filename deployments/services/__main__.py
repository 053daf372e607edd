"""`python -m deployments.services deploy|undeploy --address <gcs host:port>`: what `rma up` (or an admin) runs to
start the services app at /api on the pool's Serve instance, as a short-lived Ray driver.

The services' database schema is migrated first (Alembic, deployments/services/migrations). Settings come from
`RMA_SERVICES_*` (deployments/services/settings.py); the Ray cluster token from
RAY_AUTH_TOKEN_PATH (run it with `rma_ray.raynode.ray_env(token_file)`). Serve must already be started
(rma_ray.serve_admin). Prints one JSON line on success; one error line and exit 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def migrate_database() -> str | None:
    """The services' Alembic migrations, run before the app is deployed (a replica runs them too, on first use,
    if the Postgres store is not up yet). Returns the schema revision, or None when Postgres is not reachable."""
    from deployments.services.db import Database, store_endpoint
    from deployments.services.errors import ServiceError
    from deployments.services.migrate import current
    from deployments.services.settings import ServicesSettings

    db = Database(ServicesSettings().database, lambda store: store_endpoint(store, timeout=20))
    try:
        db.sessions()
    except ServiceError as exc:
        if exc.code == "schema_migration_failed":
            raise RuntimeError(exc.message) from None
        print(f"services: {exc.message}; the replicas migrate the schema when it is", file=sys.stderr)
        return None
    assert db.engine is not None
    try:
        with db.engine.connect() as c:
            return current(c)
    finally:
        db.engine.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.services")
    ap.add_argument("action", choices=["deploy", "undeploy"])
    ap.add_argument("--address", required=True, help="GCS address of the pool's Ray head")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the app to run")
    args = ap.parse_args(argv)
    try:
        import ray
        from ray import serve

        from deployments.services.app import APP_NAME, ROUTE_PREFIX, build_app

        ray.init(address=args.address, namespace="rma", logging_level="ERROR", log_to_driver=False)
        try:
            if args.action == "undeploy":
                serve.delete(APP_NAME)
                print(json.dumps({"undeployed": APP_NAME}))
                return 0
            started = time.monotonic()
            schema = migrate_database()
            try:
                serve.run(build_app(), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
            except TimeoutError:  # Serve gives its proxies 60 s; on a busy box they take longer: keep waiting
                pass
            while True:
                app = serve.status().applications.get(APP_NAME)
                state = str(getattr(app, "status", "")).rsplit(".", 1)[-1]
                if state == "RUNNING":
                    break
                if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                    raise RuntimeError(f"the services app is {state}: {getattr(app, 'message', '')[:500]}")
                if time.monotonic() - started > args.timeout:
                    raise RuntimeError(f"the services app was not running after {args.timeout:.0f} s ({state})")
                time.sleep(1)
            print(json.dumps({"app": APP_NAME, "route_prefix": ROUTE_PREFIX, "schema": schema,
                              "ready_s": round(time.monotonic() - started, 1)}))
        finally:
            ray.shutdown()
    except Exception as exc:  # one line for the operator; details are in the Serve logs
        print(f"services {args.action} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
