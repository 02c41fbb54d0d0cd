"""Runs `gateway batch score ... --json` in this process; prints one JSON line: code, rows, seconds, peak_mb.

Exits with the command's code. Peak memory is this process's VmHWM (see common.peak_rss_mb).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time

from benchmarks.common import peak_rss_mb
from gateway.cli import main

if __name__ == "__main__":
    output = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(output):
        code = main(sys.argv[1:])
    seconds = time.perf_counter() - started
    if code != 0:
        sys.stderr.write(output.getvalue())
    rows = json.loads(output.getvalue())["rows"] if code == 0 else -1
    print(json.dumps({"code": code, "rows": rows, "seconds": seconds, "peak_mb": peak_rss_mb()}))
    sys.exit(code)
