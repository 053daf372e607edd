"""The embedded LLM's converted folder, shared by every test that deploys the LLM app.

`python -m deployments prepare` (GGUF -> HF folder) costs ~26 s of CPU on an idle 2-core box and twice that on a
busy one. The folder is kept between runs and between modules, as a pool's data dir keeps it: keyed by the GGUF's
size and mtime, built atomically under a file lock (deployments/llm/prepare.py), so a stale or half-written one is
never used. On a fresh clone it starts empty and the first LLM module converts into it.

A replica that converts on its own node, into a folder of its own, is still tested: tests/e2e/test_edge.py's edge
donor (an edge's deployment gets no path of the core's, rma_ray.head.edge_app_env, so its replica converts under
the edge's home on every run).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
# Point RMA_TEST_LLM_MODEL_DIR elsewhere, or at an empty dir, to convert again.
MODEL_CACHE = Path(os.environ.get("RMA_TEST_LLM_MODEL_DIR", ROOT / "artifacts" / "llm-models" / MODEL))
