"""The long chaos run: any size, any seed; prints a summary table and writes the report as JSON.

    .venv/bin/python scripts/chaos.py --generations 500 --seed 7
    .venv/bin/python scripts/chaos.py --generations 60 --seed 1 --json var/chaos.json

Starts its own Temporal dev server (on a database file, restarted once mid-run), worker
processes and the API, on free loopback ports; nothing else is touched. Exits 1 if any
invariant was violated (see tests/chaos/invariants.py), 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.report import render_markdown, render_table  # noqa: E402
from tests.chaos.runner import ChaosConfig, run_chaos  # noqa: E402


def config_from(args: argparse.Namespace) -> ChaosConfig:
    config = ChaosConfig(generations=args.generations, seed=args.seed, workers=args.workers,
                         work_dir=args.work_dir, keep_work_dir=args.keep)
    # Keep the offered load near 1 generation a second unless told otherwise.
    config.submit_window_s = args.window if args.window is not None else max(30.0, args.generations * 1.0)
    config.users = max(2, min(20, args.generations // 15))
    if args.no_server_restart:
        config.server_restart_at = None
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run Atelier under injected faults and audit every credit.")
    parser.add_argument("--generations", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=float, default=None,
                        help="seconds over which submissions are spread (default: one a second, at least 30)")
    parser.add_argument("--no-server-restart", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where databases, blobs and process logs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (it is always kept on a violation)")
    parser.add_argument("--json", type=Path, default=ROOT / "var" / "chaos-report.json",
                        help="where to write the report (default: var/chaos-report.json)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for the docs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    report = asyncio.run(run_chaos(config_from(args)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    print(render_table(report))
    if args.markdown:
        print("\n" + render_markdown(report))
    print(f"\nreport: {args.json}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
