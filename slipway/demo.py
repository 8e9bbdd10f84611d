"""``make demo``: run the main job on embedded defaults and show the result.

For now the main job is: migrate a fresh embedded registry, register what exists and show it. Later
pillars extend this into the full promotion demo (bootstrap, fine-tune, gate, canary, promote).
"""

from __future__ import annotations

import sys


def main() -> int:
    from slipway.cli import main as cli

    steps = [
        ["db", "upgrade"],
        ["models", "list"],
        ["audit", "verify"],
    ]
    for argv in steps:
        print(f"$ slipway {' '.join(argv)}", flush=True)
        rc = cli(argv)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
