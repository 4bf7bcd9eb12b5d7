"""The model catalogue: which models may serve which kind, in which order.

Plain data and pure functions. `rank` is what select_model uses: lower priority number
first, then lower cost; a model recently failing goes last but is never dropped, so that
when every model is unhealthy we still try one rather than fail without trying.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from atelier.messages import Kind
from atelier.providers.base import PROVIDER_NAMES
from atelier.settings import Settings

ALL_KINDS = [kind.value for kind in Kind]
# Optional quota fields of an entry, and their upper bound (a typo of 1e9 is not a quota).
QUOTA_FIELDS = ("max_concurrent", "per_minute")
MAX_QUOTA = 100_000


class CatalogueError(ValueError):
    """The models file is unreadable or one of its entries is wrong; the message names both."""


@dataclass
class ModelEntry:
    name: str
    provider: str
    priority: int
    cost: int
    kinds: list[str] = field(default_factory=lambda: list(ALL_KINDS))
    # The provider's quota for this model, across every worker and host (None: not declared).
    max_concurrent: int | None = None
    per_minute: int | None = None


def default_catalogue(provider: str) -> list[ModelEntry]:
    if provider == "gemini":
        return [
            ModelEntry("gemini-2.5-flash-image", "gemini", priority=1, cost=4, kinds=list(ALL_KINDS)),
            ModelEntry("gemini-3-pro-image-preview", "gemini", priority=2, cost=13, kinds=list(ALL_KINDS)),
        ]
    return [
        ModelEntry("local-studio", "local", priority=1, cost=0, kinds=list(ALL_KINDS)),
        ModelEntry("local-studio-backup", "local", priority=2, cost=0, kinds=list(ALL_KINDS)),
    ]


def load_catalogue(settings: Settings) -> list[ModelEntry]:
    if settings.model_catalogue is None:
        return default_catalogue(settings.provider)
    return load_catalogue_file(settings.model_catalogue)


def load_catalogue_file(path: Path) -> list[ModelEntry]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogueError(f"models file {path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogueError(f"models file {path}: not valid JSON ({exc})") from None
    items = raw.get("models") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise CatalogueError(f'models file {path}: expected {{"models": [...]}} with at least one entry')
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(items, start=1):
        entry = _entry(item, f"models file {path}: entry {index}")
        if entry.name in seen:
            raise CatalogueError(f"models file {path}: entry {index} ({entry.name!r}): duplicate name")
        seen.add(entry.name)
        entries.append(entry)
    return entries


def _entry(item: Any, where: str) -> ModelEntry:
    if not isinstance(item, dict):
        raise CatalogueError(f"{where}: must be an object")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CatalogueError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    unknown = set(item) - {"name", "provider", "priority", "cost", "kinds", "comment", *QUOTA_FIELDS}
    if unknown:
        raise CatalogueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    provider = item.get("provider")
    if provider not in PROVIDER_NAMES:
        raise CatalogueError(f"{where}: 'provider' must be one of {', '.join(sorted(PROVIDER_NAMES))}, not {provider!r}")
    numbers = {}
    for key in ("priority", "cost"):
        value = item.get(key)
        # bool is an int in Python; `true` is not a priority.
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CatalogueError(f"{where}: {key!r} must be a whole number >= 0, not {value!r}")
        numbers[key] = value
    kinds = item.get("kinds", ALL_KINDS)
    if not isinstance(kinds, list) or not kinds or any(kind not in ALL_KINDS for kind in kinds):
        raise CatalogueError(f"{where}: 'kinds' must be a non-empty list of {', '.join(ALL_KINDS)}, not {kinds!r}")
    quotas = {}
    for key in QUOTA_FIELDS:
        value = item.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_QUOTA):
            raise CatalogueError(f"{where}: {key!r} must be a whole number from 1 to {MAX_QUOTA} (or absent), "
                                 f"not {value!r}")
        quotas[key] = value
    return ModelEntry(name=name.strip(), provider=provider, priority=numbers["priority"],
                      cost=numbers["cost"], kinds=list(dict.fromkeys(kinds)), **quotas)


def rank(entries: Iterable[ModelEntry], kind: str, exclude: set[str], unhealthy: set[str]) -> list[ModelEntry]:
    """The models to try for `kind`, best first. Excluded models are dropped; unhealthy ones go last."""
    candidates = [entry for entry in entries if kind in entry.kinds and entry.name not in exclude]
    return sorted(candidates, key=lambda e: (e.name in unhealthy, e.priority, e.cost, e.name))
