"""rma-ollama's HEALTHCHECK: rma-node's check (agent and Ray node alive) and Ollama answering on its address."""

from __future__ import annotations

import os
import sys
import urllib.request

sys.path.insert(0, "/usr/local/lib/rma")
from healthcheck import check as node_check  # noqa: E402  (rma-node's check, beside this file in the image)


def check() -> str | None:
    problem = node_check()
    if problem:
        return problem
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434")
    url = (host if "://" in host else f"http://{host}") + "/api/version"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
    except OSError as exc:
        return f"Ollama does not answer at {url}: {exc}"
    return None


if __name__ == "__main__":
    problem = check()
    print(problem or "healthy: agent, Ray node and Ollama running")
    sys.exit(1 if problem else 0)
