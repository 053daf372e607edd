"""Document-ingest job figures: pages per minute of `POST /api/jobs/ingest` (parse -> OCR -> index -> entities).

`rma up` of the embedded default with the services (Postgres for the jobs, Chroma for RAG, the graph store,
Redis for the meter; free ports, its own data dir and HOME), a client key from the coordinator, then `--runs`
jobs one after another over the same kind of PDF: `--pages` pages with a text layer, every `--scan-every`th one
a scanned page (an image, no text layer: read by OCR), each job with a shared RAG collection and graph
extraction. Each job's time is from its create to `succeeded` as the client sees it (GET polled every 0.2 s).
Prints one JSON line: pages/minute of each run, the mean, the pages OCR'd, and the load; asserts nothing.

    flock /tmp/rma-heavy.lock .venv/bin/python -m bench.ingest [--runs 3] [--pages 20] [--scan-every 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.pool_down import up_argv
from tests.support import GiveUp, wait_for

WORDS = "Ana Lima met Bruno Costa in Lisbon to sign the lease for the new office of Acme Corporation.".split()


def document(pages: int, scan_every: int, seed: int) -> bytes:
    """A PDF of `pages` pages: text ones made with reportlab, every `scan_every`th an image of text."""
    from pypdf import PdfReader, PdfWriter

    from tests import services_samples as samples

    w = PdfWriter()
    for n in range(1, pages + 1):
        lines = [" ".join(WORDS[(i + n + seed) % len(WORDS) :] + WORDS[: (i + n) % 7]) for i in range(12)]
        part = (
            samples.scanned_pdf(lines[:3])
            if scan_every and n % scan_every == 0
            else samples.pdf(["\n".join(lines)])
        )
        for page in PdfReader(io.BytesIO(part)).pages:
            w.add_page(page)
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def up(root: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = up_argv("services", "postgres,redis,chroma,graph", "--no-edge")
    log = root / "up.log"
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def started() -> bool:
        if proc.poll() is not None:
            raise GiveUp(f"rma up exited {proc.returncode}: {log.read_text()[-3000:]}")
        return "stop with Ctrl-C or `rma down`" in log.read_text(errors="replace")

    wait_for(started, timeout=1500, interval=2, what="rma up to finish starting")
    return proc


def one_job(c: httpx.Client, pdf: bytes, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = c.post(
        "/jobs/ingest",
        files={"file": (f"bench-{n}.pdf", pdf, "application/pdf")},
        data={"rag": '{"collection": "bench"}', "graph": "true"},
    )
    r.raise_for_status()
    job_id = r.json()["id"]
    done = wait_for(
        lambda: (j := c.get(f"/jobs/{job_id}").json())["state"] in ("succeeded", "failed", "cancelled") and j,
        timeout=1800,
        interval=0.2,
        what=f"job {job_id} to finish",
    )
    return {"seconds": time.perf_counter() - t0, "job": done}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--scan-every", type=int, default=5, help="every Nth page scanned (0: none)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rma-ingest-bench-"))
    env = {**os.environ, "HOME": str(root / "home"), "RMA_DATA_DIR": str(root / "data"), "COLUMNS": "200"}
    proc = up(root, env)
    runs: list[dict[str, Any]] = []
    try:
        from rma_ray import poolinfo

        info = poolinfo.read(root / "data")
        admin = httpx.Client(
            base_url=str(info.coordinator_url),
            headers={"Authorization": f"Bearer {info.admin_key}"},
            timeout=60,
        )
        key = admin.post("/api/admin/clients", json={"name": "bench-ingest"}).json()["key"]
        api = str(info.serve_url).rstrip("/") + "/api"
        with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=300) as c:
            wait_for(lambda: c.get("/jobs").status_code == 200, timeout=300, what="the jobs route to answer")
            one_job(c, document(2, 2, 99), -1)  # warm-up: every model loaded once
            for n in range(args.runs):
                runs.append(one_job(c, document(args.pages, args.scan_every, n), n))
        load = os.getloadavg()
    finally:
        subprocess.run(
            [sys.executable, "-m", "rma_ray.cli", "down"], env=env, capture_output=True, timeout=900
        )
        if proc.poll() is None:
            proc.kill()
    ppm = [args.pages / (r["seconds"] / 60) for r in runs]
    print(
        json.dumps(
            {
                "pages": args.pages,
                "scanned_every": args.scan_every,
                "runs": len(runs),
                "states": [r["job"]["state"] for r in runs],
                "seconds": [round(r["seconds"], 1) for r in runs],
                "pages_per_minute": [round(x, 1) for x in ppm],
                "mean_pages_per_minute": round(sum(ppm) / len(ppm), 1) if ppm else None,
                "ocr_pages": [r["job"]["result"].get("ocr_pages") for r in runs],
                "chunks": [r["job"]["result"].get("chunks") for r in runs],
                "entities": [r["job"]["result"].get("entities") for r in runs],
                "load": [round(x, 1) for x in load],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
