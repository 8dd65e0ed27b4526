"""Result values to JSON and back, for the results cache. Only core's frozen dataclasses."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from core import types

# The result types the cache may hold, by name.
_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        types.Caption,
        types.OcrResult,
        types.Tags,
        types.MoodLabels,
        types.Answer,
        types.SocialCaption,
    )
}


def encode(value: Any) -> str:
    name = type(value).__name__
    if _TYPES.get(name) is not type(value):
        raise TypeError(f"{name} is not a cacheable result type")
    return json.dumps({"type": name, "value": dataclasses.asdict(value)}, ensure_ascii=False)


def decode(text: str) -> Any:
    document = json.loads(text)
    return _build(_TYPES[document["type"]], document["value"])


def _build(hint: Any, raw: Any) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint, vars(types))
        return hint(
            **{f.name: _build(hints[f.name], raw[f.name]) for f in dataclasses.fields(hint)}
        )
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], item) for item in raw)
        return tuple(_build(arg, item) for arg, item in zip(args, raw, strict=True))
    return raw
