"""Reading a Flower message's arrays without a copy, and freeing them once read.

Flower's ``Array.numpy()`` loads the array's .npy bytes into a new ndarray, a
second copy of every delta the coordinator reads; :func:`array_view` reads them
as a view instead.

Flower 1.41's records keep a bound method of themselves (``RecordDict`` checks the
records put into it with its own ``check_value``), so every message's content sits
in a reference cycle. Its arrays' bytes are then freed only when Python's cyclic
collector runs, which in a ServerApp that allocates few objects can be rounds later:
with a 160 MB adapter, every site's delta and every pushed global adapter stayed
alive well past the round that used them. Emptying the array records drops the
bytes at once; the message shells are left to the collector.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, Message

from ..common.npy import npy_view


def array_view(array: Array) -> np.ndarray:
    """The values of a Flower ``Array`` as a read-only view of its bytes.

    What :func:`~wardround.common.npy.read_npy` reads (what ``Array.numpy()``
    reads, without pickle), without ``Array.numpy()``'s copy.
    """
    return npy_view(array.data)


def release_arrays(messages: Iterable[Message]) -> None:
    """Empty every array record of these messages (their other records stay)."""
    for msg in messages:
        if msg.has_content():
            for record in msg.content.array_records.values():
                record.clear()
