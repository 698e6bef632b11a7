"""Incremental text of a sequence: multi-byte characters, stop strings across token boundaries."""

from __future__ import annotations

from service.engines.sequence import Sequence
from service.engines.types import FinalEvent, GenerationRequest, Sampling, TokenEvent
from service.models import byte_tokenizer
from steering.compile import CompiledRequest


def feed(text: str, stop: list[str], max_tokens: int = 100) -> list:
    tok = byte_tokenizer()
    events: list = []
    req = GenerationRequest(prompt="x", sampling=Sampling(max_tokens=max_tokens, stop=stop))
    seq = Sequence(req, CompiledRequest({"prompt": {}, "generation": {}}, [], []), [1], events.append, tok)
    for b in text.encode("utf-8"):
        if seq.done:
            break
        seq.take(b, {}, eos=set())
    return events


def streamed(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


def test_multibyte_characters_are_never_split():
    events = feed("héllo wörld ✓", [], max_tokens=len("héllo wörld ✓".encode()))
    assert all("\ufffd" not in e.text for e in events if isinstance(e, TokenEvent))
    assert streamed(events) == events[-1].text == "héllo wörld ✓"
    assert events[-1].finish_reason == "length"


def test_stop_string_straddling_tokens_is_cut_and_never_streamed():
    events = feed("héllo wörld and more", ["wö"])
    fin = events[-1]
    assert isinstance(fin, FinalEvent) and fin.finish_reason == "stop_string"
    assert fin.text == streamed(events) == "héllo "


def test_held_back_prefix_of_a_stop_string_is_released_at_the_end():
    text = "abc ab"
    events = feed(text, ["abx"], max_tokens=len(text))
    assert events[-1].finish_reason == "length"
    assert events[-1].text == text  # the trailing "ab" was held back, then flushed into the final text
    assert streamed(events) + events[-1].tail == text and events[-1].tail == "ab"
