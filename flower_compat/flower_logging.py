"""Flower's logger, quietened.

Flower sets its ``flwr`` logger's level and handler when ``flwr.common.logger`` is
first imported, so a level set before that import is overwritten. It sets the
level to DEBUG and filters in its own handler only, so every DEBUG line also
reaches the root logger's handlers (``wardround``'s, which print it) unless the
``flwr`` logger's level is raised here.
"""

from __future__ import annotations

import logging


def quiet_flower(level: int = logging.ERROR) -> None:
    """Load Flower's logger, then set its level (Flower logs every sampling and stage)."""
    import flwr.common.logger  # noqa: F401  (Flower sets its own level on import)

    logging.getLogger("flwr").setLevel(level)


def flower_lines_once() -> None:
    """Print Flower's lines once, through the root logger's handlers.

    Flower's logger has a console handler of its own and also hands every line on
    to the root logger, so under ``wardround``'s handler each of its warnings
    printed twice. Its own handler is taken off while the root logger has one.
    """
    from flwr.common.logger import console_handler

    if logging.getLogger().handlers:
        logging.getLogger("flwr").removeHandler(console_handler)


def filter_flower_records(record_filter: logging.Filter) -> None:
    """Pass every record Flower logs through ``record_filter`` (after its import)."""
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.addFilter(record_filter)
