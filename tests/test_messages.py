"""The message dataclasses as the SDK's payload converter meets them."""

from __future__ import annotations

import dataclasses
import inspect

from temporalio.converter import DataConverter

from atelier import messages


def _dataclasses() -> list[type]:
    return [c for _, c in inspect.getmembers(messages, inspect.isclass)
            if dataclasses.is_dataclass(c) and c.__module__ == messages.__name__]


def test_message_annotations_are_evaluated_once_at_import_not_at_every_decode():
    """The converter calls typing.get_type_hints on a dataclass each time it decodes one; string
    annotations (`from __future__ import annotations`) make every such call evaluate them again,
    five times the cost. Every message must carry real types."""
    found = _dataclasses()
    assert len(found) > 20
    stringly = {c.__name__: [n for n, a in c.__annotations__.items() if isinstance(a, str)] for c in found}
    assert {k: v for k, v in stringly.items() if v} == {}


async def test_every_message_round_trips_through_the_default_converter():
    converter = DataConverter.default
    for cls in _dataclasses():
        value = cls()  # every field has a default (old histories keep decoding)
        [payload] = await converter.encode([value])
        [back] = await converter.decode([payload], [cls])
        assert back == value, cls.__name__
