"""How long the coordinator takes to build every donor's contributions (GET /api/admin/contributions, the
registry page's table): `admission.services.contributions.overview` on a SQLite database with `--donors`
registered donors, 20 of them with a minute row every 7 minutes for the last 10 hours, for 24 and 168 hours of
series. With `--baseline-rev REV` the same calls on that revision's module (`git show`), interleaved, with the
ratio and a check that both give the same answer. Prints one line per series length; asserts nothing.

    .venv/bin/python -m bench.contributions --donors 2000 --baseline-rev 0e359aa
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[1]


def baseline(rev: str, folder: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:admission/services/contributions.py"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = folder / "contributions_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("contributions_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.contributions")
    ap.add_argument("--donors", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-rev", help="a git revision whose overview() runs beside this checkout's")
    args = ap.parse_args()

    from admission import migrate
    from admission.db import make_engine, make_sessionmaker
    from admission.models import ContributionMinute, Worker
    from admission.services import contributions
    from rma_ray.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix="rma-contrib-bench-"))
    old = baseline(args.baseline_rev, folder) if args.baseline_rev else None
    engine = make_engine(f"sqlite:///{folder / 'db.sqlite'}")
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    with sessions() as s, s.begin():
        for i in range(args.donors):
            s.add(
                Worker(
                    id=f"w{i:06d}",
                    name=f"pc{i}",
                    tier="service",
                    capabilities={},
                    labels={},
                    node_token_hash="0" * 64,
                )
            )
        s.flush()
        for i in range(min(20, args.donors)):
            for m in range(0, 600, 7):
                s.add(
                    ContributionMinute(
                        worker_id=f"w{i:06d}",
                        minute=now - timedelta(minutes=m),
                        cpu_s=1.5,
                        gpu_s=0.0,
                        requests=3,
                        tokens=40,
                    )
                )

    class State:
        settings = Settings()

    def timed(module: Any, hours: int) -> tuple[float, Any]:
        with sessions() as s:
            t = time.perf_counter()
            out = module.overview(State, s, now=now, hours=hours)
            return time.perf_counter() - t, out

    for hours in (24, 168):
        this = base = 0.0
        same = True
        for _ in range(args.rounds):
            if old is not None:
                dt, a = timed(old, hours)
                base += dt
            dt, b = timed(contributions, hours)
            this += dt
            if old is not None:
                same = same and a.model_dump() == b.model_dump()
        line = f"donors {args.donors}, {hours} h series: {this / args.rounds * 1000:.0f} ms"
        if old is not None:
            line += (
                f"; {args.baseline_rev}: {base / args.rounds * 1000:.0f} ms; "
                f"ratio {this / base:.2f}; same answer: {'yes' if same else 'NO'}"
            )
        print(line)
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
