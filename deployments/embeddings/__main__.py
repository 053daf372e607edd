"""`python -m deployments.embeddings deploy|undeploy --address <gcs host:port>`: what `rma up` (or an admin)
runs to start `POST /v1/embeddings` and the embedding model the RAG services share. Settings from
`RMA_EMBEDDINGS_*` (deployments/embeddings/config.py); the Ray cluster token from RAY_AUTH_TOKEN_PATH. Prints
one JSON line on success; one error line and exit 1 on failure."""

from __future__ import annotations

import argparse
import sys

from deployments.driver import failed, run_action


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.embeddings")
    ap.add_argument("action", choices=["deploy", "undeploy"])
    ap.add_argument("--address", required=True, help="GCS address of the pool's Ray head")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the app to run")
    args = ap.parse_args(argv)
    try:
        from deployments.embeddings import app
        from deployments.embeddings.config import EmbeddingSettings

        settings = EmbeddingSettings()
    except Exception as exc:
        return failed("embeddings", args.action, exc)
    return run_action("embeddings", args.address, args.action,
                      lambda: app.deploy(settings, blocking_timeout_s=args.timeout), app.undeploy)


if __name__ == "__main__":
    sys.exit(main())
