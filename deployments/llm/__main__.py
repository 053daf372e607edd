"""`python -m deployments.llm deploy|undeploy|prepare`: what `rma up` (or an admin) runs to start the LLM apps.

    python -m deployments.llm deploy --address <gcs host:port>     # serve.run both apps, wait until RUNNING
    python -m deployments.llm undeploy --address <gcs host:port>   # delete them (vLLM's engine process goes too)
    python -m deployments.llm prepare                              # convert the embedded model now (progress line)

Settings come from `RMA_LLM_*` (see deployments/llm/config.py); the Ray cluster token from RAY_AUTH_TOKEN_PATH
(run it with `rma_ray.raynode.ray_env(token_file)`). Serve must already be started (rma_ray.serve_admin). Prints
one JSON line on success; one error line and exit 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from deployments.driver import failed, run_action


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.llm")
    ap.add_argument("action", choices=["deploy", "undeploy", "prepare"])
    ap.add_argument("--address", help="GCS address of the pool's Ray head (deploy, undeploy)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the apps to run")
    args = ap.parse_args(argv)

    from deployments.llm.config import LLMSettings

    try:
        settings = LLMSettings()
        if args.action == "prepare":
            from deployments.llm.prepare import prepare_embedded

            print(json.dumps({"model_dir": str(prepare_embedded(settings.embedded_dir(), progress=True))}))
            return 0
        if not args.address:
            ap.error("--address is required for deploy and undeploy")
        from deployments.llm import app
    except Exception as exc:
        return failed("llm", args.action, exc)
    return run_action("llm", args.address, args.action,
                      lambda: app.deploy(settings, blocking_timeout_s=args.timeout), app.undeploy)


if __name__ == "__main__":
    sys.exit(main())
