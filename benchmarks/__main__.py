"""`make bench`: run the benchmarks and print markdown tables for benchmarks/RESULTS.md.

python -m benchmarks [--seconds S] [--rounds R] [--only serving]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from benchmarks import (
    batch,
    control,
    fleet,
    fleet_guardian,
    fleet_takeover,
    guardrails,
    serving,
    shadow,
    streaming,
    telemetry,
    throughput,
    triggers,
)

SUITES = {
    "serving": serving,
    "control": control,
    "telemetry": telemetry,
    "shadow": shadow,
    "guardrails": guardrails,
    "batch": batch,
    "fleet": fleet,
    "streaming": streaming,
    "triggers": triggers,
    "fleet-guardian": fleet_guardian,
    "fleet-takeover": fleet_takeover,
    "throughput": throughput,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per configuration")
    parser.add_argument("--only", choices=sorted(SUITES), action="append")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/latest.md"))
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    sections = [f"Machine: {machine}\nCommand: {' '.join(['python -m benchmarks', *sys.argv[1:]])}\n"]
    for name in args.only or sorted(SUITES):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        sections.append(f"## {name}\n\n" + SUITES[name].run(args.seconds, args.rounds, (1, 8, 32)))
        print(sections[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(sections) + "\n")
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
