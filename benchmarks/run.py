"""Run every benchmark: each ``benchmarks/bench_*.py`` in turn, in its own process.

``python benchmarks/run.py [--only NAME ...] [ARGS ...]`` (``nox -s bench -- ARGS``): the
output of each benchmark is shown as it runs; any other argument (``--quick``, which every
benchmark accepts) is passed on to each. Exits 1 if any benchmark fails, after running all.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only bench_NAME.py (repeatable)",
    )
    args, passthrough = parser.parse_known_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {name.removeprefix("bench_").removesuffix(".py") for name in args.only}
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
        missing = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if missing:
            parser.error(f"no benchmarks/bench_{sorted(missing)[0]}.py")
    if not scripts:
        print("no benchmarks/bench_*.py to run", file=sys.stderr)
        return 1
    outcomes: list[tuple[str, int, float]] = []
    for script in scripts:
        print(f"\n=== {script.name} {' '.join(passthrough)}".rstrip(), flush=True)
        start = time.perf_counter()
        status = subprocess.call([sys.executable, str(script), *passthrough])
        outcomes.append((script.name, status, time.perf_counter() - start))
    print("\n=== summary")
    for name, status, seconds in outcomes:
        verdict = "ok" if status == 0 else f"FAILED (exit status {status})"
        print(f"{name:24s} {verdict:28s} {seconds:6.1f} s")
    return 0 if all(status == 0 for _, status, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
