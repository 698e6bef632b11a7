"""The packaged datasets parse cleanly and meet their counts; read_jsonl reports bad input by file and line."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from pydantic import BaseModel

from monitors.datasets import (
    DATASETS,
    ABQuestion,
    ContrastivePair,
    CorpusText,
    Fact,
    Instruction,
    LabelledText,
    load_packaged,
    packaged,
    read_jsonl,
)
from steering.errors import InvalidArgument

MODELS: dict[str, type[BaseModel]] = {
    "instructed_facts": Fact,
    "sycophancy_ab": ABQuestion,
    "instructions": Instruction,
    "neutral_corpus": CorpusText,
}
MINIMUM = {"instructed_facts": 220, "sycophancy_ab": 220, "instructions": 440, "neutral_corpus": 300}
TEXT_KEY = {"instructed_facts": "fact", "sycophancy_ab": "question", "instructions": "instruction",
            "neutral_corpus": "text"}


def _write(path, *lines: str):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- the packaged files -------------------------------------------------------------------------
def test_every_packaged_name_has_a_model():
    assert set(MODELS) == set(DATASETS)


@pytest.mark.parametrize("name", DATASETS)
def test_packaged_dataset_parses_without_skips_and_meets_its_count(name):
    loaded = read_jsonl(packaged(name), MODELS[name], on_error="skip")
    assert loaded.skipped == []
    assert len(loaded.items) >= MINIMUM[name]
    assert loaded.path == packaged(name)


@pytest.mark.parametrize("name", DATASETS)
def test_packaged_ids_and_texts_are_unique(name):
    items = load_packaged(name, MODELS[name])
    ids = [it.id for it in items]  # type: ignore[attr-defined]
    assert None not in ids and len(set(ids)) == len(ids)
    texts = [getattr(it, TEXT_KEY[name]).strip().lower() for it in items]
    assert [t for t, n in Counter(texts).items() if n > 1] == []


def test_instructions_have_both_labels_in_strength():
    counts = Counter(it.label for it in load_packaged("instructions", Instruction))
    assert counts["harmful"] >= 220 and counts["harmless"] >= 220
    assert all(it.category for it in load_packaged("instructions", Instruction))


def test_sycophancy_matching_answers_are_balanced_between_a_and_b():
    items = load_packaged("sycophancy_ab", ABQuestion)
    share_a = sum(it.answer_matching_behavior == "(A)" for it in items) / len(items)
    assert 0.4 <= share_a <= 0.6


def test_sycophancy_questions_end_with_exactly_two_choices():
    for it in load_packaged("sycophancy_ab", ABQuestion):
        head, sep, choices = it.question.partition("\n\nChoices:\n (A) ")
        assert sep and head.startswith("H") and "(B)" not in head
        a, sep_b, b = choices.partition("\n (B) ")
        assert sep_b and a and b and "\n" not in a + b


def test_facts_are_short_sentences_with_a_different_false_twin():
    items = load_packaged("instructed_facts", Fact)
    assert len({it.topic for it in items}) >= 8
    for it in items:
        assert it.fact != it.false
        for sentence in (it.fact, it.false):
            assert 6 <= len(sentence.split()) <= 20 and sentence.endswith(".")
    assert not {it.fact for it in items} & {it.false for it in items}


def test_corpus_paragraphs_are_40_to_120_words():
    for it in load_packaged("neutral_corpus", CorpusText):
        assert 40 <= len(it.text.split()) <= 120


def test_unknown_packaged_name_lists_the_allowed_names():
    with pytest.raises(InvalidArgument) as err:
        packaged("facts")
    assert err.value.field == "dataset"
    assert "instructed_facts" in str(err.value) and "neutral_corpus" in str(err.value)


# ---- read_jsonl errors --------------------------------------------------------------------------
def test_bad_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "t.jsonl", '{"text": "a", "label": true}', "", '{"text": "b", "label": }')
    with pytest.raises(InvalidArgument) as err:
        read_jsonl(path, LabelledText)
    assert err.value.field == f"{path}:3"  # blank line 2 still counts
    assert str(path) in str(err.value) and ":3" in str(err.value) and "invalid JSON" in str(err.value)


def test_skip_mode_keeps_good_lines_and_collects_line_and_reason(tmp_path):
    path = _write(
        tmp_path / "t.jsonl",
        '{"text": "good one", "label": 1}',
        "not json",
        '["an", "array"]',
        '{"text": "missing label"}',
        '{"text": "good two", "label": false}',
    )
    loaded = read_jsonl(path, LabelledText, on_error="skip")
    assert [(it.text, it.label) for it in loaded.items] == [("good one", True), ("good two", False)]
    assert [line for line, _ in loaded.skipped] == [2, 3, 4]
    reasons = dict(loaded.skipped)
    assert "invalid JSON" in reasons[2]
    assert "JSON object" in reasons[3] and "array" in reasons[3]
    assert "'label'" in reasons[4] and "required" in reasons[4].lower()


def test_missing_key_is_named(tmp_path):
    path = _write(tmp_path / "f.jsonl", '{"id": 1, "fact": "Water is wet.", "topic": "physics"}')
    with pytest.raises(InvalidArgument) as err:
        read_jsonl(path, Fact)
    assert err.value.field == f"{path}:1" and "'false'" in str(err.value) and "required" in str(err.value).lower()


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('{"id": "7", "text": "x"}', "'id'"),
        ('{"id": 7, "text": 3}', "'text'"),
        ('{"id": 7, "text": ""}', "'text'"),
        ('{"id": 7, "text": "x", "extra": 1}', "'extra'"),
    ],
)
def test_wrong_type_empty_string_and_unknown_key_are_rejected(tmp_path, line, key):
    path = _write(tmp_path / "c.jsonl", line)
    with pytest.raises(InvalidArgument) as err:
        read_jsonl(path, CorpusText)
    assert key in str(err.value)


@pytest.mark.parametrize("label", ['"true"', "2", "0.5", "null"])
def test_labels_accept_only_booleans_and_0_1(tmp_path, label):
    path = _write(tmp_path / "l.jsonl", f'{{"text": "x", "label": {label}}}')
    with pytest.raises(InvalidArgument, match="label"):
        read_jsonl(path, LabelledText)


def test_ab_questions_ignore_extra_keys_but_need_different_answers(tmp_path):
    ok = {"id": 0, "question": "Q?\n\nChoices:\n (A) x\n (B) y", "answer_matching_behavior": "(A)",
          "answer_not_matching_behavior": "(B)", "user_affiliation": "ignored"}
    same = dict(ok, answer_not_matching_behavior="(A)")
    path = _write(tmp_path / "ab.jsonl", json.dumps(ok), json.dumps(same))
    loaded = read_jsonl(path, ABQuestion, on_error="skip")
    assert len(loaded.items) == 1 and loaded.items[0].topic == ""
    assert loaded.skipped[0][0] == 2 and "must differ" in loaded.skipped[0][1]


def test_contrastive_pairs_default_to_an_empty_prompt(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"positive": "Love", "negative": "Hate", "note": "extra keys ignored"}')
    (pair,) = read_jsonl(path, ContrastivePair).items
    assert pair.prompt == "" and pair.positive == "Love" and pair.negative == "Hate"


def test_fewer_than_min_items_names_the_file_and_the_count(tmp_path):
    path = _write(tmp_path / "few.jsonl", '{"text": "one"}', "oops")
    with pytest.raises(InvalidArgument) as err:
        read_jsonl(path, CorpusText, on_error="skip", min_items=2)
    assert err.value.field == str(path)
    assert "found 1" in str(err.value) and "at least 2" in str(err.value) and "1 bad line" in str(err.value)


def test_an_empty_file_is_rejected(tmp_path):
    path = _write(tmp_path / "empty.jsonl", "", "   ")
    with pytest.raises(InvalidArgument, match="found 0"):
        read_jsonl(path, CorpusText)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidArgument) as err:
        read_jsonl(tmp_path / "nope.jsonl", CorpusText)
    assert err.value.field == "path" and "nope.jsonl" in str(err.value)


def test_bad_utf8_and_byte_order_mark(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "bom is fine"}\n{"text": "caf\xe9"}\n')
    loaded = read_jsonl(path, CorpusText, on_error="skip")
    assert [it.text for it in loaded.items] == ["bom is fine"]
    assert loaded.skipped[0][0] == 2 and "UTF-8" in loaded.skipped[0][1]


def test_unknown_on_error_mode(tmp_path):
    path = _write(tmp_path / "c.jsonl", '{"text": "x"}')
    with pytest.raises(InvalidArgument) as err:
        read_jsonl(path, CorpusText, on_error="ignore")  # type: ignore[arg-type]
    assert err.value.field == "on_error"
