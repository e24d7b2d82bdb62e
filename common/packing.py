"""One array per adapter on the wire: the tensors packed in a declared layout.

Flower moves every array of a message as objects of its own, one request each: an
adapter sent tensor by tensor costs a request per tensor and per hop. Wire version 2
(:data:`~wardround.common.wire.WIRE_VERSION`) packs the adapter into one float32
vector instead, in the order of an :class:`AdapterLayout`: the tensors' names,
sorted, with their shapes. Both sides derive the layout from their own model, so the
vector carries no names; the coordinator states the digest of the global adapter's
layout in every message, and a site whose model lays the adapter out differently
refuses before it trains.

Pure: no I/O, no Flower.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import FederationError


@dataclass(frozen=True)
class AdapterLayout:
    """The adapter tensors as (name, shape), sorted by name: the packed vector's order."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.tensors]
        if names != sorted(set(names)):
            raise ValueError("an adapter layout names each tensor once, sorted")
        for name, shape in self.tensors:
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(
                    f"adapter tensor {name!r} has an invalid shape {shape}"
                )

    @classmethod
    def of_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> AdapterLayout:
        """The layout of tensors with these shapes."""
        return cls(
            tuple(
                (str(name), tuple(int(d) for d in shapes[name]))
                for name in sorted(shapes)
            )
        )

    @classmethod
    def of_state(cls, state: Mapping[str, np.ndarray]) -> AdapterLayout:
        """The layout of these tensors."""
        return cls.of_shapes({name: value.shape for name, value in state.items()})

    @property
    def names(self) -> tuple[str, ...]:
        """The tensor names, in packed order."""
        return tuple(name for name, _ in self.tensors)

    @property
    def size(self) -> int:
        """The packed vector's length."""
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in self.tensors)

    @property
    def digest(self) -> str:
        """A short SHA-256 of the names and shapes: what both sides compare."""
        text = json.dumps([[name, list(shape)] for name, shape in self.tensors])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def pack(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        """The tensors as one contiguous float32 vector, in layout order."""
        if set(state) != set(self.names):
            extra = sorted(set(state) - set(self.names))
            missing = sorted(set(self.names) - set(state))
            raise FederationError(
                f"the adapter does not fit its layout: {len(extra)} tensor(s) not in "
                f"it {extra[:3]}, {len(missing)} missing {missing[:3]}",
                hint="Both sides must build the adapter from the same model section.",
            )
        out = np.empty(self.size, dtype=np.float32)
        offset = 0
        for name, shape in self.tensors:
            value = np.asarray(state[name])
            if tuple(value.shape) != shape:
                raise FederationError(
                    f"adapter tensor {name!r} has shape {tuple(value.shape)}, its "
                    f"layout says {shape}",
                    hint="Both sides must build the adapter from the same model section.",
                )
            out[offset : offset + value.size] = value.reshape(-1)
            offset += value.size
        return out

    def unpack(self, vector: np.ndarray) -> OrderedDict[str, np.ndarray]:
        """The named tensors of a packed vector (views into it, float32)."""
        if vector.ndim != 1 or vector.size != self.size:
            raise FederationError(
                f"the packed adapter has shape {tuple(vector.shape)}; its layout "
                f"needs a vector of {self.size} values",
                hint="Both sides must build the adapter from the same model section "
                "and run the same wire version.",
            )
        flat = np.asarray(vector, dtype=np.float32)
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        offset = 0
        for name, shape in self.tensors:
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = flat[offset : offset + count].reshape(shape)
            offset += count
        return out
