"""The TOML writer behind `check-config`: whatever it writes, a TOML reader reads back as the same values."""

from __future__ import annotations

import math
import tomllib

from hypothesis import given
from hypothesis import strategies as st

from proxy.config.toml import dumps

keys = st.text(min_size=1, max_size=8)
scalars = (st.text(max_size=12) | st.booleans() | st.integers(-(2**63), 2**63 - 1)
           | st.floats(allow_nan=False))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=8)
tables = st.dictionaries(keys, values, max_size=4)


@given(st.dictionaries(keys, tables, max_size=3), st.lists(tables, max_size=2))
def test_what_is_written_reads_back(sections, archives):
    document = {**sections, "archives": archives}
    assert tomllib.loads(dumps(document)) == document


def test_floats_stay_floats_and_comments_are_comments():
    text = dumps({"server": {"grace": 30.0, "big": math.inf, "port": 8080, "public_url": None}},
                 comments={("server", "grace"): "seconds", ("server", "public_url"): "not set"})
    assert "grace = 30.0  # seconds" in text and "# public_url: not set" in text
    assert tomllib.loads(text) == {"server": {"grace": 30.0, "big": math.inf, "port": 8080}}
