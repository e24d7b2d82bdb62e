"""Flower's command-line entry points wardround calls in-process.

The site daemon starts Flower's SuperNode from its own process (after pacing it,
:mod:`.pacing`); the coordinator builds a FAB from the project folder to launch runs.
"""

from __future__ import annotations

from flwr.cli.build import build_fab_from_disk
from flwr.supernode.cli import flower_supernode

__all__ = ["build_fab_from_disk", "flower_supernode"]
