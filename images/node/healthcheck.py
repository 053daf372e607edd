"""rma-node's HEALTHCHECK: healthy while this container's donor agent (`rma join`) and its Ray node (the raylet's
process tree) are alive, as recorded in the membership file the agent writes on the data volume. It asks the
coordinator nothing: a coordinator outage must not make every donor container unhealthy. One line, exit 0 or 1."""

from __future__ import annotations

import sys

import psutil

from rma_ray import membership
from rma_ray.settings import Settings


def check() -> str | None:
    """None when healthy, else why not."""
    data_dir = Settings().data_dir
    m = membership.load(data_dir)
    if m is None:
        return f"not in a pool yet (no {membership.path(data_dir)})"
    if not (m.agent_pid and psutil.pid_exists(m.agent_pid)):
        return f"the agent (pid {m.agent_pid}) is not running"
    if not (m.ray_pid and psutil.pid_exists(m.ray_pid)):
        return f"the Ray node (pid {m.ray_pid}) is not running"
    return None


if __name__ == "__main__":
    problem = check()
    print(problem or "healthy: agent and Ray node running")
    sys.exit(1 if problem else 0)
