"""Checking a value against a dataclass field's type, shared by the job config (:mod:`catlens.config`) and the
fine-tune config (:mod:`catlens.finetune.config`); the two differ only in the error type, the message's prefix and
the hints.

    >>> from catlens._typecheck import check_field_type
    >>> check_field_type(3.0, int, where="run.seed"), check_field_type(["a"], tuple[str, ...], where="x")
    (3, ('a',))
    >>> check_field_type("3", int | None, where="run.threads")
    Traceback (most recent call last):
    ...
    ValueError: run.threads='3': expected an integer or null.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from typing import Any


def split_optional(tp: Any) -> tuple[bool, Any]:
    """``(optional, base)``: whether ``tp`` admits ``None``, and ``tp`` without it (``int | None`` -> ``int``)."""
    optional = type(None) in typing.get_args(tp)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if optional else tp
    return optional, base


def is_mapping_type(tp: Any) -> bool:
    return typing.get_origin(tp) in (Mapping, dict) or tp is Mapping


def type_name(tp: Any, *, tuple_name: str = "a list of strings") -> str:
    """What a field of type ``tp`` takes, in words (``int | None`` -> ``"an integer or null"``)."""
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        return tuple_name
    if is_mapping_type(tp):
        return "a table of options"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and type(None) in typing.get_args(tp):
        return f"{type_name(args[0], tuple_name=tuple_name)} or null"
    return str(tp)


def check_field_type(value: Any, tp: Any, *, where: str, error: type[Exception] = ValueError,
                     tuple_name: str = "a list of strings", tuple_hint: str = "", mapping_hint: str = "") -> Any:
    """``value`` converted to ``tp``: ints stay ints (an integral float becomes an int), an int is accepted for a
    float, floats must be finite, a list of strings becomes a tuple, a table (string keys) is returned as given.
    A wrong value raises ``error("<where>=<value!r>: expected <type><hint>.")``, the hint (e.g. an example) added
    for tuple and table fields. A type not listed here lets the value through."""
    optional, base = split_optional(tp)

    def bad(why: str = "") -> Exception:
        return error(f"{where}={value!r}: expected {type_name(tp, tuple_name=tuple_name)}{why}.")

    if value is None:
        if optional:
            return None
        raise bad()
    if base is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                return int(value)
            raise bad()
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):
            raise bad(" (got a non-finite number)")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if typing.get_origin(base) is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                not all(isinstance(v, str) for v in value):
            raise bad(tuple_hint)
        return tuple(value)
    if is_mapping_type(base):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise bad(mapping_hint)
        return value
    return value
