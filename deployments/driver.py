"""The shared end of the `python -m deployments.<app> deploy|undeploy` drivers that `rma up` runs as child
processes: connect to the pool's Ray (the cluster token from RAY_AUTH_TOKEN_PATH), deploy or undeploy, print one
JSON line on success; one error line and exit 1 on failure (details are in the Serve logs)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def failed(what: str, action: str, exc: BaseException) -> int:
    print(f"{what} {action} failed: {exc}", file=sys.stderr)
    return 1


def run_action(what: str, address: str, action: str, deploy: Callable[[], Any],
               undeploy: Callable[[], Any]) -> int:
    """`deploy()` returns what to print; `undeploy()` deletes the app(s) and waits for them to go."""
    try:
        import ray

        ray.init(address=address, namespace="rma", logging_level="ERROR", log_to_driver=False)
        try:
            if action == "deploy":
                print(json.dumps(deploy()))
            else:
                undeploy()
                print(json.dumps({"undeployed": True}))
        finally:
            ray.shutdown()
    except Exception as exc:  # one line for the operator
        return failed(what, action, exc)
    return 0
