"""Typed JSONL readers for the datasets steerwatch ships and the ones users bring.

Extraction (CAA), probe training and the refusal direction all start from small JSONL files; a typo
in one of them should stop the run with the file and line to fix, not surface later as a shape error
or a silently empty class. So every line is parsed into a pydantic model, and every failure is an
``InvalidArgument`` whose field is ``"<path>:<line>"`` (1-based) and whose message says what is wrong.
Callers that prefer to keep going over a few bad lines pass ``on_error="skip"`` and get the skipped
lines back as ``(line, reason)`` instead. Pure pydantic + stdlib: no torch, no service imports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from steering.errors import invalid

DATA_DIR = Path(__file__).parent / "data"
DATASETS: tuple[str, ...] = ("instructed_facts", "sycophancy_ab", "instructions", "neutral_corpus")

Text = Annotated[str, StringConstraints(min_length=1)]
Answer = Literal["(A)", "(B)"]


def packaged(name: str) -> Path:
    """Path of a dataset shipped in the wheel (``monitors/data/<name>.jsonl``)."""
    if name not in DATASETS:
        raise invalid("dataset", f"unknown packaged dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return DATA_DIR / f"{name}.jsonl"


class Fact(BaseModel):
    """A true statement and a minimally edited false counterpart (instructed-pairs probes, true/false eval)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: int
    fact: Text
    false: Text
    topic: Text


class ABQuestion(BaseModel):
    """A Rimsky-style CAA A/B item; extra keys are ignored so files from other sources load as they are."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: int | None = None  # Rimsky-format files carry no id
    question: Text
    answer_matching_behavior: Answer
    answer_not_matching_behavior: Answer
    topic: str = ""

    @model_validator(mode="after")
    def _answers_differ(self) -> ABQuestion:
        if self.answer_matching_behavior == self.answer_not_matching_behavior:
            raise ValueError(
                "answer_matching_behavior and answer_not_matching_behavior must differ "
                f"(both are {self.answer_matching_behavior})"
            )
        return self


class Instruction(BaseModel):
    """One user request, harmful (an aligned model should refuse) or harmless (it should comply)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: int
    instruction: Text
    label: Literal["harmful", "harmless"]
    category: str = ""


class CorpusText(BaseModel):
    """A neutral paragraph (SAE training, KL of steering on prompts unrelated to the behaviour)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: int | None = None
    text: Text


class ContrastivePair(BaseModel):
    """A user pair for ``extract caa``: text+ is ``prompt + positive``, text- is ``prompt + negative``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = ""
    positive: Text
    negative: Text


class LabelledText(BaseModel):
    """A text with a binary label for ``train probe``; the label is a JSON boolean or the integer 0/1."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: Text
    label: bool

    @field_validator("label", mode="before")
    @classmethod
    def _bool_or_bit(cls, value: Any) -> Any:
        # Only true/false and 0/1: "yes", "1" or 0.5 are more likely a wrong column than a label.
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise ValueError(f"label must be true/false or 0/1, got {value!r}")


M = TypeVar("M", bound=BaseModel)


@dataclass
class Loaded(Generic[M]):
    """Parsed items, the ``(line, reason)`` of lines skipped under ``on_error="skip"``, and the file read."""

    items: list[M]
    skipped: list[tuple[int, str]]
    path: Path


def read_jsonl(
    path: str | Path,
    model: type[M],
    *,
    on_error: Literal["reject", "skip"] = "reject",
    min_items: int = 1,
) -> Loaded[M]:
    """Parse one JSON object per line into ``model``; blank lines are ignored.

    ``on_error="reject"`` raises on the first bad line; ``"skip"`` records it and goes on. Either way
    fewer than ``min_items`` valid items is an error, because a near-empty class would only show up
    later as a degenerate direction or probe.
    """
    if on_error not in ("reject", "skip"):
        raise invalid("on_error", f"must be 'reject' or 'skip', got {on_error!r}")
    file = Path(path)
    loaded: Loaded[M] = Loaded(items=[], skipped=[], path=file)
    for line, raw in _lines(file):
        item, reason = _parse_line(raw, model, first=line == 1)
        if item is not None:
            loaded.items.append(item)
        elif on_error == "skip":
            loaded.skipped.append((line, reason))
        else:
            raise invalid(f"{file}:{line}", reason)
    if len(loaded.items) < min_items:
        skipped = f" ({len(loaded.skipped)} bad line(s) skipped)" if loaded.skipped else ""
        raise invalid(
            str(file),
            f"found {len(loaded.items)} valid {model.__name__} items{skipped}, need at least {min_items}",
        )
    return loaded


def load_packaged(name: str, model: type[M]) -> list[M]:
    """Items of a packaged dataset; the shipped files are tested to parse without a skipped line."""
    return read_jsonl(packaged(name), model).items


def _lines(file: Path) -> list[tuple[int, bytes]]:
    """Numbered raw lines (1-based) that are not blank; a missing or unreadable file is an error."""
    if not file.is_file():
        raise invalid("path", f"{file} does not exist or is not a regular file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise invalid("path", f"cannot read {file}: {exc.strerror or exc}") from exc
    return [(n, raw) for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]


def _parse_line(raw: bytes, model: type[M], *, first: bool) -> tuple[M | None, str]:
    """The parsed item, or None and a reason that names the key and the rule that failed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start + 1})"
    if first:
        text = text.removeprefix("\ufeff")  # files saved by some editors start with a byte-order mark
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {_json_type(obj)}"
    try:
        return model.model_validate(obj), ""
    except ValidationError as exc:
        return None, _describe(exc, model)


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    """One clause per pydantic error: ``key 'label': Input should be 'harmful' or 'harmless'``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"key {loc!r}: {err['msg']}" if loc else err["msg"])
    return f"not a valid {model.__name__}: " + "; ".join(parts)


def _json_type(obj: object) -> str:
    """The JSON name of a parsed value, for messages written for people who edit JSON, not Python."""
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)
