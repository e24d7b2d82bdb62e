"""The index's ``path`` column keeps any POSIX file name losslessly."""

import os
import sys

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardround.sitedata.dicom_index import file_path, stored_path

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX byte names")
names = st.binary(min_size=1, max_size=12).filter(
    lambda name: b"/" not in name and b"\x00" not in name and name not in (b".", b"..")
)


@settings(max_examples=200, deadline=None)
@given(st.lists(names, min_size=1, max_size=4))
def test_any_absolute_path_round_trips_through_an_arrow_string(parts):
    path = os.fsdecode(b"/" + b"/".join(parts))

    column = pa.array([stored_path(path)], pa.string())  # Arrow refuses surrogates

    assert os.fsencode(file_path(column[0].as_py())) == b"/" + b"/".join(parts)


def test_a_utf8_path_is_stored_as_it_is():
    assert stored_path("/data/Müller/im%20é.dcm") == "/data/Müller/im%20é.dcm"
