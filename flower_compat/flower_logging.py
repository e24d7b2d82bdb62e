"""Flower's logger, quietened.

Flower sets its ``flwr`` logger's level and handler when ``flwr.common.logger`` is
first imported, so a level set before that import is overwritten.
"""

from __future__ import annotations

import logging


def quiet_flower(level: int = logging.ERROR) -> None:
    """Load Flower's logger, then set its level (Flower logs every sampling and stage)."""
    import flwr.common.logger  # noqa: F401  (Flower sets its own level on import)

    logging.getLogger("flwr").setLevel(level)
