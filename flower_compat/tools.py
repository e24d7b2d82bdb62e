"""Flower's command-line entry points wardround calls in-process.

The site daemon starts Flower's SuperNode from its own process (after pacing it,
:mod:`.pacing`); the coordinator builds a FAB from the project folder to launch runs. How the
SuperNode parses ``--node-config`` and loads a site's key pair is Flower's too
(the site's tests check its files and flags against them).
"""

from __future__ import annotations

from flwr.cli.build import build_fab_from_disk
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args
from flwr.supernode.cli import flower_supernode
from flwr.supernode.cli.flower_supernode import (
    _try_setup_client_authentication as try_setup_client_authentication,
)

__all__ = [
    "build_fab_from_disk",
    "flower_supernode",
    "parse_config_args",
    "try_load_public_key",
    "try_setup_client_authentication",
]
