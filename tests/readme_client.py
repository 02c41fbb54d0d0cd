"""Run the README's tritonclient snippet as written, against TARGET instead of localhost:8001.

Usage: python readme_client.py HOST:PORT
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet() -> str:
    """The README's Python block that uses tritonclient."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    (code,) = [str(b) for b in blocks if "tritonclient" in b]
    return code


if __name__ == "__main__":
    exec(snippet().replace("localhost:8001", sys.argv[1]), {"__name__": "__readme__"})
