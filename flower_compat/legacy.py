"""Flower's legacy message API, which SecAgg+ still needs (flwr 1.41).

SecAgg+ exists only in the legacy workflow: its train messages carry ``FitIns``
and its replies ``FitRes``, converted to and from record dicts by Flower's compat
module. wardround code imports these names from here, never from ``flwr.common``
or ``flwr.compat``.
"""

from __future__ import annotations

from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat

__all__ = [
    "Code",
    "FitIns",
    "FitRes",
    "Parameters",
    "Status",
    "bytes_to_ndarray",
    "ndarray_to_bytes",
    "ndarrays_to_parameters",
    "parameters_to_ndarrays",
    "recorddict_compat",
]
