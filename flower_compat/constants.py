"""Flower constants wardround relies on (error codes, record types, heartbeats)."""

from __future__ import annotations

from flwr.common.constant import (
    HEARTBEAT_DEFAULT_INTERVAL,
    HEARTBEAT_PATIENCE,
    RUNTIME_DEPENDENCY_INSTALL,
    SUPERLINK_NODE_ID,
    ErrorCode,
    SType,
    SubStatus,
)

__all__ = [
    "HEARTBEAT_DEFAULT_INTERVAL",
    "HEARTBEAT_PATIENCE",
    "RUNTIME_DEPENDENCY_INSTALL",
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "SType",
    "SubStatus",
]
