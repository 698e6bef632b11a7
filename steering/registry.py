"""In-process registry of the tensors that requests reference by id: vectors, probes and SAEs.

Registration validates once; a request only names ids. The service issue persists vectors behind the
same interface.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from monitors.probes import LinearReader
from steering.errors import AlreadyExists, NotFound, invalid
from steering.vectors import SteeringVector

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Registry keys may also be scoped ("<tenant>/<id>", built by the service from two checked ids).
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._:-]{0,127})?$")


def check_id(value: str, field: str) -> str:
    """Ids are 1-128 characters of letters, digits, '.', '_', ':' and '-'."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise invalid(field, f"{value!r} is not a valid id (1-128 of letters, digits, . _ : -; starting alphanumeric)")
    return value


class Registry:
    """Thread-safe maps id -> SteeringVector | LinearReader | SAE."""

    def __init__(self, d_model: int | None = None) -> None:
        self.d_model = d_model
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {"vector": {}, "probe": {}, "sae": {}}

    def add_vector(self, id_: str, vec: SteeringVector, *, replace: bool = False) -> None:
        self._check_width(vec.d_model, f"vector {id_!r}")
        self._put("vector", id_, vec, replace)

    def add_probe(self, id_: str, probe: LinearReader, *, replace: bool = False) -> None:
        self._check_width(probe.d_model, f"probe {id_!r}")
        self._put("probe", id_, probe, replace)

    def add_sae(self, id_: str, sae: Any, *, replace: bool = False) -> None:
        self._check_width(sae.d_in, f"sae {id_!r}")
        self._put("sae", id_, sae, replace)

    def vector(self, id_: str, field: str = "vector") -> SteeringVector:
        return self._get("vector", id_, field)

    def probe(self, id_: str, field: str = "probe") -> LinearReader:
        return self._get("probe", id_, field)

    def sae(self, id_: str, field: str = "sae") -> Any:
        return self._get("sae", id_, field)

    def ids(self, kind: str) -> list[str]:
        with self._lock:
            return sorted(self._items[kind])

    def remove(self, kind: str, id_: str, *, missing_ok: bool = False) -> None:
        with self._lock:
            if self._items[kind].pop(id_, None) is None and not missing_ok:
                raise NotFound(f"{kind}: no {kind} registered with id {id_!r}", field=kind)

    def has(self, kind: str, id_: str) -> bool:
        with self._lock:
            return id_ in self._items[kind]

    def _check_width(self, width: int, what: str) -> None:
        if self.d_model is not None and width != self.d_model:
            raise invalid("d_model", f"{what} has width {width}; this model's residual stream has {self.d_model}")

    def _put(self, kind: str, id_: str, item: Any, replace: bool) -> None:
        if not isinstance(id_, str) or not KEY_PATTERN.match(id_):
            check_id(id_, f"{kind}.id")  # raises with the user-facing rule
        with self._lock:
            if id_ in self._items[kind] and not replace:
                raise AlreadyExists(f"{kind}.id: {id_!r} is registered already", field=f"{kind}.id")
            self._items[kind][id_] = item

    def _get(self, kind: str, id_: str, field: str) -> Any:
        with self._lock:
            item = self._items[kind].get(id_)
        if item is None:
            known = self.ids(kind)
            raise NotFound(f"{field}: no {kind} with id {id_!r}; registered: {known[:20]}", field=field)
        return item
