"""The settings table for the README, rendered from `Settings` itself so it cannot drift.

    python -m atelier.settings_doc      # prints the Markdown table

Each row: the environment variable(s), the type with its bounds, the default, and the
field's `Field(description=...)`.
"""

from __future__ import annotations

import enum
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo

from atelier.settings import Settings


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The variables a field is read from; an alias replaces the prefixed name."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    if isinstance(alias, str):
        return [alias]
    return [(Settings.model_config.get("env_prefix", "") + name).upper()]


def all_env_names() -> dict[str, str]:
    """Every variable the settings read, mapped to its field name."""
    return {var: name for name, field in Settings.model_fields.items() for var in env_names(name, field)}


def _type(field: FieldInfo) -> str:
    text = str(field.annotation) if not isinstance(field.annotation, type) else field.annotation.__name__
    for long, short in (("pydantic.types.SecretStr", "secret"), ("SecretStr", "secret"),
                        ("pathlib.Path", "path"), ("Path", "path"), (" | None", ", optional")):
        text = text.replace(long, short)
    bounds = []
    for meta in field.metadata:
        for kind, attr, sign in ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<")):
            if isinstance(meta, kind):
                bounds.append(f"{sign} {getattr(meta, attr)}")
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "(none)"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    if value == "":
        return "(empty)"
    if value == []:
        return "(none)"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_table() -> str:
    lines = ["| variable | type | default | what it is |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        variables = " or ".join(f"`{v}`" for v in env_names(name, field))
        lines.append(f"| {variables} | {_cell(_type(field))} | {_cell(_default(field))} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_table(), end="")
