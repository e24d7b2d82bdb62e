"""Wire version 2's packed adapter: one float32 vector in a declared layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wardround.common.errors import FederationError
from wardround.common.packing import AdapterLayout

SHAPES = {"b.lora_B.weight": (3, 2), "a.lora_A.weight": (2, 3), "head.bias": (4,)}

shapes = st.dictionaries(
    st.text("abcdefgh.", min_size=1, max_size=6),
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=6,
)


@given(shapes, st.integers(0, 2**32 - 1))
def test_pack_then_unpack_gives_back_every_tensor(tensor_shapes, seed):
    rng = np.random.default_rng(seed)
    state = {
        k: rng.standard_normal(s).astype(np.float32) for k, s in tensor_shapes.items()
    }
    layout = AdapterLayout.of_state(state)

    packed = layout.pack(state)
    back = layout.unpack(packed)

    assert packed.dtype == np.float32 and packed.shape == (layout.size,)
    assert list(back) == sorted(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_the_layout_is_sorted_by_name_and_its_digest_names_shapes_and_order():
    layout = AdapterLayout.of_shapes(SHAPES)

    assert layout.names == ("a.lora_A.weight", "b.lora_B.weight", "head.bias")
    assert layout.size == 16
    assert (
        layout.digest == AdapterLayout.of_shapes(dict(reversed(SHAPES.items()))).digest
    )
    reshaped = AdapterLayout.of_shapes({**SHAPES, "head.bias": (2, 2)})
    renamed = AdapterLayout.of_shapes(
        {"z.bias" if k == "head.bias" else k: s for k, s in SHAPES.items()}
    )
    assert len({layout.digest, reshaped.digest, renamed.digest}) == 3


def test_a_state_that_does_not_fit_the_layout_is_refused():
    layout = AdapterLayout.of_shapes(SHAPES)
    state = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

    with pytest.raises(FederationError, match="1 tensor"):
        layout.pack({**state, "stolen.weight": np.zeros(2, np.float32)})
    with pytest.raises(FederationError, match="1 missing"):
        layout.pack({k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(FederationError, match="layout says"):
        layout.pack({**state, "head.bias": np.zeros((2, 2), np.float32)})


@pytest.mark.parametrize("vector", [np.zeros(15), np.zeros(17), np.zeros((2, 8))])
def test_a_vector_of_another_length_or_rank_is_refused(vector):
    with pytest.raises(FederationError, match="needs a vector of 16"):
        AdapterLayout.of_shapes(SHAPES).unpack(vector.astype(np.float32))


def test_a_layout_names_each_tensor_once_in_order():
    with pytest.raises(ValueError, match="once, sorted"):
        AdapterLayout((("b", (1,)), ("a", (1,))))
