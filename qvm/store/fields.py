"""Reading a JSON record field by field, checked: the one way every record in a run dir,
and every message of the supervisor's protocol, is parsed where it is read.

A ``Fields`` wraps the decoded object and the name of where it came from. Each accessor
returns the value with its type checked, or raises ``RecordError`` naming the file (or
message) and the key, so a renamed key or a planted value is one clear line, never a
``KeyError`` three modules away or a wrong guess. Stdlib only: the supervisor's spawn
code reads records before anything heavier is imported.
"""

from __future__ import annotations

import builtins
import math
import os
from collections.abc import Callable

from qvm.base.checking import TYPE_CHECKING
from qvm.base.jsonfile import read_json_strict
from qvm.base.record import Record
from qvm.errors import RecordError

if TYPE_CHECKING:
    from typing import Any, Self, TypeVar

    _T = TypeVar("_T")
    _D = TypeVar("_D")
    _R = TypeVar("_R", bound=Record)

if not TYPE_CHECKING:  # typing's then (the linters know its stubs by it), this one now

    def overload(stub: object) -> object:
        """typing's, but for its registry, which nothing reads: the definition after the
        stubs takes the name as it does with typing's."""
        return stub

else:
    from typing import overload


_MISSING = object()
_SHOWN = 60  # characters of a bad value quoted in a message


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


class Fields:
    """The keys of one JSON object, read with their types checked."""

    def __init__(self, data: Any, source: str, hint: str | None = None) -> None:
        if not isinstance(data, dict):
            raise RecordError(source, "", f"must be a JSON object, got {_shown(data)}", hint)
        self.data = data
        self.source = source
        self.hint = hint

    def fail(self, key: str, problem: str) -> RecordError:
        return RecordError(self.source, key, problem, self.hint)

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.fail(key, "missing")
            return default
        return value

    def _typed(self, key: str, default: Any, check: Callable[[Any], bool], what: str) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not check(value):
            raise self.fail(key, f"must be {what}, got {_shown(value)}")
        return value

    # Each accessor's type: the checked value's, or the default's when one is given (the
    # default is returned as is when the key is absent, and mostly None).
    @overload
    def str(self, key: str) -> str: ...
    @overload
    def str(self, key: str, default: _D) -> str | _D: ...
    def str(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda v: isinstance(v, str), "a string")

    @overload
    def int(self, key: builtins.str) -> int: ...
    @overload
    def int(self, key: builtins.str, default: _D) -> int | _D: ...
    def int(self, key: builtins.str, default: Any = _MISSING) -> Any:
        return self._typed(
            key, default, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
        )

    @overload
    def pid(self, key: builtins.str) -> builtins.int: ...
    @overload
    def pid(self, key: builtins.str, default: _D) -> builtins.int | _D: ...
    def pid(self, key: builtins.str, default: Any = _MISSING) -> Any:
        """A process id: a positive integer within the kernel's range."""
        return self._typed(
            key,
            default,
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**22 + 1,
            "a process id",
        )

    @overload
    def float(self, key: builtins.str) -> float: ...
    @overload
    def float(self, key: builtins.str, default: _D) -> float | _D: ...
    def float(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self._typed(
            key,
            default,
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            "a number",
        )
        return float(value) if isinstance(value, int) else value

    @overload
    def bool(self, key: builtins.str) -> bool: ...
    @overload
    def bool(self, key: builtins.str, default: _D) -> bool | _D: ...
    def bool(self, key: builtins.str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda v: isinstance(v, bool), "true or false")

    @overload
    def one_of(self, key: builtins.str, choices: tuple[builtins.str, ...]) -> builtins.str: ...
    @overload
    def one_of(
        self, key: builtins.str, choices: tuple[builtins.str, ...], default: _D
    ) -> builtins.str | _D: ...
    def one_of(
        self, key: builtins.str, choices: tuple[builtins.str, ...], default: Any = _MISSING
    ) -> Any:
        return self._typed(key, default, lambda v: v in choices, "one of " + ", ".join(choices))

    @overload
    def str_list(self, key: builtins.str) -> tuple[builtins.str, ...]: ...
    @overload
    def str_list(self, key: builtins.str, default: _D) -> tuple[builtins.str, ...] | _D: ...
    def str_list(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self._typed(
            key,
            default,
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "a list of strings",
        )
        return tuple(value) if isinstance(value, list) else value

    @overload
    def object(self, key: builtins.str) -> Fields: ...
    @overload
    def object(self, key: builtins.str, default: _D) -> Fields | _D: ...
    def object(self, key: builtins.str, default: Any = _MISSING) -> Any:
        """A nested object as ``Fields`` (or the default when absent or null)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if value is None and default is None:
            return None
        return Fields(value, f"{self.source}: {key}", self.hint)

    @overload
    def mapping(self, key: builtins.str) -> dict[builtins.str, Any]: ...
    @overload
    def mapping(self, key: builtins.str, default: _D) -> dict[builtins.str, Any] | _D: ...
    def mapping(self, key: builtins.str, default: Any = _MISSING) -> Any:
        """A nested object kept as it is, a dict of its own (or the default when absent
        or null): QMP's arguments, what a snapshot's load depends on."""
        found = self.object(key) if default is _MISSING else self.object(key, None)
        return default if found is None else dict(found.data)

    @overload
    def records(self, key: builtins.str, read: Callable[[Fields], _T]) -> tuple[_T, ...]: ...
    @overload
    def records(
        self, key: builtins.str, read: Callable[[Fields], _T], default: _D
    ) -> tuple[_T, ...] | _D: ...
    def records(
        self, key: builtins.str, read: Callable[[Fields], _T], default: Any = _MISSING
    ) -> Any:
        """A list of nested objects, each read by ``read``."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {_shown(value)}")
        return tuple(
            read(Fields(item, f"{self.source}: {key}[{index}]", self.hint))
            for index, item in enumerate(value)
        )

    def any(self, key: builtins.str, default: Any = _MISSING) -> Any:
        """A value qvm passes along without looking into it (e.g. QMP arguments)."""
        return self._get(key, default)

    def declared(self, cls: type[_R], **given: Any) -> _R:
        """The record ``cls``, each field not ``given`` read under its own name as its
        annotation declares (``int``, ``str | None``, ``tuple[str, ...]``...): a field
        with a default, or declared ``| None``, may be absent (or null). The ``given``,
        read by the caller first, name their problems before the others."""
        values = dict(given)
        for field, read, default in _declared_plan(cls):
            if field in given:
                continue
            if read is None:
                raise TypeError(f"{cls.__name__}.{field}: not read by its type: give it")
            values[field] = read(self, field, default)
        return cls(**values)


# how a field of each declared type is read: with ``declared``, a record's fields and
# their JSON keys are one list, written once
_READERS: dict[str, Callable[..., Any]] = {
    "str": Fields.str,
    "int": Fields.int,
    "float": Fields.float,
    "bool": Fields.bool,
    "tuple[str, ...]": Fields.str_list,
}
_Plan = tuple[tuple[str, "Callable[..., Any] | None", "Any"], ...]  # no typing at run time
_PLANS: dict[type, _Plan] = {}


def _declared_plan(cls: type[Record]) -> _Plan:
    """Each field of ``cls``: its name, its reader (None: a type ``_READERS`` does not
    know) and its default (``_MISSING``: the key must be there)."""
    plan = _PLANS.get(cls)
    if plan is None:
        steps = []
        for field in cls._fields:
            declared = cls.__annotations__[field]
            base = declared.removesuffix(" | None")
            default = None if base != declared else _MISSING
            steps.append((field, _READERS.get(base), cls._field_defaults.get(field, default)))
        plan = _PLANS[cls] = tuple(steps)
    return plan


class PlainRecord(Record):
    """A record whose JSON object is its fields as they are, each read as declared (a
    subclass reads the fields ``declared`` cannot, e.g. a ``one_of``, in its ``read``)."""

    @classmethod
    def read(cls, f: Fields) -> Self:
        return f.declared(cls)

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


def read_record(
    path: str | os.PathLike[str], parse: Callable[[Any, str], _T], hint: str | None = None
) -> _T | None:
    """The record in the file at ``path``, read by ``parse(data, source)``; None when the
    file does not exist. Unreadable, not JSON, too big or the wrong shape: RecordError
    (``hint``: what to do about a file that is not JSON at all)."""
    source = os.fspath(path)
    try:
        data = read_json_strict(source)
    except ValueError as error:
        problem = str(error).removeprefix(f"{source}: ")
        raise RecordError(source, "", problem, hint) from error
    return None if data is None else parse(data, source)
