"""Request.token_slice is all_ids[start:end] without building all_ids."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.engine.request import Request
from gateway.engine.sampling import SamplingParams


@given(st.lists(st.integers(0, 99), min_size=1, max_size=20), st.lists(st.integers(0, 99), max_size=20),
       st.data())
def test_token_slice_equals_all_ids_slice(prompt, output, data):
    request = Request(id="r", index=0, prompt_ids=prompt, params=SamplingParams(), max_new_tokens=8,
                      stop_token_ids=frozenset(), detokenizer=None, emit=lambda event: None)
    request.output_ids = output
    total = len(prompt) + len(output)
    start = data.draw(st.integers(0, total))
    end = data.draw(st.integers(start, total))
    assert request.token_slice(start, end) == request.all_ids[start:end]
