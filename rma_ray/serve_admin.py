"""Starting and shutting down Ray Serve on the pool's head, as a short-lived driver process
(`python -m rma_ray.serve_admin start|shutdown`), so that `rma up` itself never becomes a Ray driver.

The proxy runs on the head only (`proxy_location=HeadOnly`): clients reach Serve there, never on a donor.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rma_ray.serve_admin")
    ap.add_argument("action", choices=["start", "shutdown"])
    ap.add_argument("--address", required=True, help="GCS address of the head")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--request-timeout", type=float, default=180.0,
                    help="seconds a request may take end to end before the proxy answers 408")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    ray.init(address=args.address, namespace="rma", logging_level="ERROR", log_to_driver=False)
    try:
        if args.action == "start":
            serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port,
                                                                 "request_timeout_s": args.request_timeout})
        else:
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
