"""Runs `gateway batch score` in this process and prints its rows, seconds and peak memory as JSON."""

from __future__ import annotations

import json
import resource
import sys
import time

from gateway.cli import main

if __name__ == "__main__":
    started = time.perf_counter()
    code = main(sys.argv[1:])
    seconds = time.perf_counter() - started
    print(json.dumps({"code": code, "seconds": seconds, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
