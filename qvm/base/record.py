"""``Record``: an immutable record class, made as cheaply as a class can be.

qvm's records (definitions, run-dir records, the supervisor's messages) are
``typing.NamedTuple``-shaped: fields in annotation order, defaults, ``_replace``,
``_asdict``, ``_fields``, ``_field_defaults``, equality and unpacking as tuples. But
``typing.NamedTuple`` compiles a ``__new__`` from source text for every class (~40 µs),
and ``qvm up`` creates some forty record classes before QEMU starts. Here each class is
a tuple subclass whose fields are C-level item getters and whose ``__new__`` is one
shared function: ~10 µs a class, the same behaviour for qvm's uses
(``tests/unit/base/test_record.py`` holds it to that). Frozen dataclasses cost more still
(~10 ms for the definition's records, measured). ``qvm.errors``, which imports
nothing of qvm, has its one value class written out by hand.
"""

from __future__ import annotations

from operator import itemgetter

from qvm.base.checking import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, ClassVar, Self, dataclass_transform

    _Tuple = tuple[Any, ...]
else:
    _Tuple = tuple

    def dataclass_transform(**_: object) -> object:
        """typing's marks the class for type checkers, which read the source instead."""
        return lambda cls: cls


_NO_DEFAULT = object()
# The getter of field N, one for every record class: a property holds no reference to its
# class, so each class reads its fields through the same objects (fewer allocations at
# start-up, less memory in the long-running supervisor).
_FIELD_GETTERS: list[property] = []


def _more_field_getters(count: int) -> None:
    while len(_FIELD_GETTERS) < count:
        at = len(_FIELD_GETTERS)
        _FIELD_GETTERS.append(property(itemgetter(at), doc=f"Alias for field {at}"))


class _RecordMeta(type):
    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
        if namespace.get("__module__") == __name__ and name == "Record":
            return super().__new__(mcs, name, bases, namespace)
        fields = tuple(namespace.get("__annotations__", {}))
        if len(fields) > len(_FIELD_GETTERS):
            _more_field_getters(len(fields))
        defaults = {}
        for index, field in enumerate(fields):
            default = namespace.pop(field, _NO_DEFAULT)
            if default is not _NO_DEFAULT:
                defaults[field] = default
            elif defaults:
                raise TypeError(f"{name}.{field}: a field without a default follows one with")
            namespace[field] = _FIELD_GETTERS[index]
        namespace["__slots__"] = ()
        namespace["_fields"] = fields
        namespace["_field_defaults"] = defaults
        namespace["__match_args__"] = fields
        return super().__new__(mcs, name, bases, namespace)


# The type checker sees what a record's class is: a tuple (unpacked and indexed as one)
# whose constructor takes the annotated fields in order, with their defaults, and whose
# fields are read-only; it checks every construction against that synthesized `__init__`.
@dataclass_transform(frozen_default=True)
class Record(_Tuple, metaclass=_RecordMeta):
    """Subclass with annotated fields, as with ``typing.NamedTuple``."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _field_defaults: ClassVar[dict[str, Any]] = {}

    # hidden from the type checker, which checks calls against the `__init__` that
    # dataclass_transform synthesizes from the fields instead of this catch-all
    if not TYPE_CHECKING:

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            fields = cls._fields
            if len(args) == len(fields) and not kwargs:
                return tuple.__new__(cls, args)
            if len(args) > len(fields):
                raise TypeError(f"{cls.__name__}: {len(args)} values for {len(fields)} fields")
            values = list(args)
            defaults = cls._field_defaults
            for field in fields[len(args) :]:
                if field in kwargs:
                    values.append(kwargs.pop(field))
                elif field in defaults:
                    values.append(defaults[field])
                else:
                    raise TypeError(f"{cls.__name__}: missing field {field!r}")
            if kwargs:
                raise TypeError(f"{cls.__name__}: no field {next(iter(kwargs))!r}")
            return tuple.__new__(cls, values)

    def _replace(self, **changes: Any) -> Self:
        if not changes:
            return self
        values = [
            changes.pop(field, value) for field, value in zip(self._fields, self, strict=True)
        ]
        if changes:
            raise TypeError(f"{type(self).__name__}: no field {next(iter(changes))!r}")
        return tuple.__new__(type(self), values)

    def _asdict(self) -> dict[str, Any]:
        return dict(zip(self._fields, self, strict=True))

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{field}={value!r}" for field, value in zip(self._fields, self, strict=True)
        )
        return f"{type(self).__name__}({inner})"

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)
