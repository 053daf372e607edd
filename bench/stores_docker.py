"""Data stores under the docker runtime: start-to-ready per store (first start on an empty volume, restart on the
kept volume), the process runtime measured the same way as the baseline, image sizes, and what the private
dockerd and the image build script cost. Needs root, docker.io and debootstrap.

    .venv/bin/python -m bench.stores_docker
"""

from __future__ import annotations

import json

from tests.docker_support import bench_docker

if __name__ == "__main__":
    print(json.dumps(bench_docker(), indent=2))
