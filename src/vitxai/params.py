"""Type checks of parameter dataclasses, driven by their field annotations.

Values often arrive from the command line as JSON (``--param lime.n_samples=50.0`` gives the
float 50.0, ``=abc`` the string "abc"), so every numeric field is checked against its
annotation before the dataclass's own range and choice checks run: an ``int`` field takes
integers only (not bools, not 50.0), a ``float`` field any finite real number, a ``bool`` field
True or False, and ``X | None`` also None. Choices (``Literal``, ``str``) and nested
dataclasses are left to each dataclass, whose messages list the valid options.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool | np.bool_)  # numpy's bool is no subclass of bool


def _check(name: str, value: Any, hint: Any) -> None:
    """Raise "parameter NAME=VALUE must be ..." unless ``value`` fits ``hint``; choices and
    nested dataclasses pass (the dataclass checks them)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        if float in args and isinstance(value, numbers.Real) and not _is_bool(value):
            _check(name, value, float)  # e.g. a grey level of Literal["mean", ...] | float
            return
        rest = [a for a in args if a is not type(None)]
        # a number or a named choice, e.g. n_samples: int | Literal["auto"]
        words = [w for a in rest if typing.get_origin(a) is typing.Literal
                 for w in typing.get_args(a)]
        if isinstance(value, str) and (value in words or (words and float in rest)):
            return  # a choice, or a word for a level (e.g. a baseline): the dataclass checks
        numbers_ = [a for a in rest if a in (bool, int, float)]
        if len(numbers_) == 1 and len(rest) == 1 + bool(words):
            alternatives = " or ".join(["null"] * (type(None) in args)
                                       + [repr(w) for w in words])
            try:
                _check(name, value, numbers_[0])
            except ValueError as e:
                raise ValueError(f"{e} or {alternatives}") from None
        return
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, tuple | list):
            raise ValueError(f"parameter {name}={value!r} must be a list")
        for i, item in enumerate(value):
            _check(f"{name}[{i}]", item, args[0])
        return
    if hint is bool and not _is_bool(value):
        raise ValueError(f"parameter {name}={value!r} must be true or false")
    if hint is int and (not isinstance(value, numbers.Integral) or _is_bool(value)):
        raise ValueError(f"parameter {name}={value!r} must be an integer")
    if hint is float:
        if not isinstance(value, numbers.Real) or _is_bool(value):
            raise ValueError(f"parameter {name}={value!r} must be a number")
        if not math.isfinite(value):
            raise ValueError(f"parameter {name}={value!r} must be a finite number")


def check_types(cls: type, values: Mapping[str, Any], prefix: str = "") -> None:
    """Raise a one-line ValueError ("parameter PREFIXNAME=VALUE must be ...") for the first
    value of ``values`` that does not fit its field's annotation in dataclass ``cls``."""
    hints = _hints(cls)
    for name, value in values.items():
        _check(f"{prefix}{name}", value, hints[name])


def check_instance_types(obj: Any, prefix: str = "") -> None:
    """:func:`check_types` on every field of dataclass instance ``obj`` (for ``__post_init__``)."""
    check_types(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)},
                prefix)


def build(cls: type, values: Mapping[str, Any], owner: str) -> Any:
    """``cls(**values)``, with unknown names listed in a one-line ValueError that starts with
    ``owner`` (e.g. "--mask")."""
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{owner} has no parameter {', '.join(unknown)}; "
                         f"its parameters are: {', '.join(names)}")
    return cls(**values)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise a one-line ValueError unless ``value`` is one of ``choices`` (never a bool,
    which would otherwise equal 0 or 1)."""
    if _is_bool(value) or value not in choices:
        raise ValueError(
            f"parameter {name}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_range(name: str, value: float, low: float | None, high: float | None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise a one-line ValueError when ``value`` is outside its documented range."""
    bad = (
        (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"parameter {name}={value!r} is out of range {interval}")


def check_batch_size(name: str, value: int | None) -> None:
    """``value`` is None (the device's default, :func:`vitxai.batching.default_batch_size`)
    or a chunk size ≥ 1; otherwise a one-line ValueError."""
    if value is not None:
        check_range(name, value, 1, None)


def block_index(name: str, value: int, depth: int) -> int:
    """A block index in [−depth, depth) as Python counts (−1 = the last block) → [0, depth);
    else a one-line ValueError."""
    if not -depth <= value < depth:
        raise ValueError(f"parameter {name}={value} is out of range [-{depth}, {depth})")
    return value % depth
