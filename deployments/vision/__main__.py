"""`python -m deployments.vision deploy|undeploy`: start or stop the vision route's Serve apps on the pool.

    python -m deployments.vision deploy --address <gcs host:port>    # front RUNNING; backend placed when it can be
    python -m deployments.vision undeploy --address <gcs host:port>

Settings come from `RMA_VISION_*` (deployments/vision/config.py); the Ray cluster token from RAY_AUTH_TOKEN_PATH.
Serve must already be started (rma_ray.serve_admin). Prints one JSON line on success; one error line and exit 1
on failure.
"""

from __future__ import annotations

import argparse
import sys

from deployments.driver import failed, run_action


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.vision")
    ap.add_argument("action", choices=["deploy", "undeploy"])
    ap.add_argument("--address", required=True, help="GCS address of the pool's Ray head")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the front to run")
    args = ap.parse_args(argv)

    from deployments.vision.config import VisionSettings

    try:
        settings = VisionSettings()
        if settings.backend == "vllm":
            settings.vllm_entry()  # an unknown or non-vision model: one line now, not a failed replica later
        from deployments.vision import app
    except Exception as exc:
        return failed("vision", args.action, exc)
    return run_action("vision", args.address, args.action,
                      lambda: app.deploy(settings, blocking_timeout_s=args.timeout), app.undeploy)


if __name__ == "__main__":
    sys.exit(main())
