"""`python -m bench [--quick] --out BENCHMARKS.md`: run the suite and write the report."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no INFO lines as servers stop

from bench.report import figures_json, render  # noqa: E402
from bench.suite import FULL, QUICK, Suite  # noqa: E402


def _load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _cpu_ticks() -> list[int]:
    """The machine's CPU time so far by kind (/proc/stat): user, nice, system, idle, iowait, irq, softirq, steal."""
    with open("/proc/stat") as stat:
        return [int(value) for value in stat.readline().split()[1:9]]


def _steal_share(before: list[int], after: list[int]) -> str:
    """Share of CPU time the hypervisor gave to other guests while we wanted it: a noise gauge of a virtual machine."""
    spent = [b - a for a, b in zip(before, after)]
    return f"{spent[7] / max(1, sum(spent)):.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, every figure (for the test)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="where the report goes")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    started, begin, load_before = datetime.datetime.now(datetime.timezone.utc), time.monotonic(), _load_average()
    ticks_before = _cpu_ticks()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - begin:6.1f}s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="shadowserve-bench-") as workdir:
        suite = Suite(QUICK if args.quick else FULL, Path(workdir), log)
        asyncio.run(suite.run())
    command = "python -m bench " + " ".join(shlex.quote(arg) for arg in (argv if argv is not None else sys.argv[1:]))
    load_after = f"{_load_average()}; CPU steal during the run: {_steal_share(ticks_before, _cpu_ticks())}"
    report = render(suite, command, started, load_before, load_after, time.monotonic() - begin)
    Path(args.out).write_text(report)
    if args.json:
        Path(args.json).write_text(figures_json(suite))
    missed = [f"{figure.number} ({figure.name})" for figure in suite.figures if not figure.passed]
    log(f"wrote {args.out}; missed: {', '.join(missed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
