"""Run Flower's SuperNode, paced for short rounds (``python -m wardround.client.supernode_main``).

The site daemon starts the SuperNode through this module rather than
``flower-supernode``: it applies :func:`wardround.flower_compat.pacing.pace_supernode`
with ``WARDROUND_SUPERNODE_POLL_S`` (from ``deployment.poll-interval-s``), then runs
Flower's own SuperNode entry point, with the same arguments.
"""

from __future__ import annotations

import os
import sys

POLL_ENV = "WARDROUND_SUPERNODE_POLL_S"


def main() -> int:
    """Flower's ``flower-supernode``, with the pacing from the environment."""
    from ..flower_compat.pacing import pace_supernode
    from ..flower_compat.tools import flower_supernode

    poll = float(os.environ.get(POLL_ENV, "0") or 0)
    if poll > 0:
        pace_supernode(poll)
    sys.argv[0] = "flower-supernode"
    flower_supernode()  # never returns a value (-> None), so the status was always 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
