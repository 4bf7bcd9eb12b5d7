"""The one small interface every AI provider client implements, and the prompt templates.

A provider receives references to stored images (`StoredImage`), never bytes: each client
reads and converts them itself, in exactly one method, so no second conversion can drop them.
Providers raise only the errors of `atelier.errors`: ContentBlocked and ProviderRejected
(retrying cannot fix them) and ProviderUnavailable (a retry may, after `retry_after_s`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from atelier.errors import InvalidRequest
from atelier.messages import RESERVED_PARAMETER_KEYS, Kind, StoredImage

# Every provider name a catalogue entry may name.
PROVIDER_NAMES = frozenset({"gemini", "local"})


@dataclass
class GenerationInput:
    kind: str
    model: str
    prompt: str
    images: list[StoredImage] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    # The style or scene asked for; empty means "see the prompt" (or parameters["style"]).
    style: str = ""


@dataclass
class GeneratedImage:
    data: bytes
    mime_type: str


@runtime_checkable
class Provider(Protocol):
    name: str

    async def generate(self, request: GenerationInput) -> list[GeneratedImage]: ...

    async def aclose(self) -> None: ...


_PHOTOGRAPHY = (
    "Create a studio-grade portrait photograph of the person in the attached photo(s). "
    "Keep the person's identity exactly: face, features, skin tone, hair and body shape must "
    "stay recognisably theirs. Professional studio lighting, sharp focus on the eyes, "
    "natural skin texture, high resolution."
)
_FITTING = (
    "Virtual try-on. Image 1 is a photo of a person; the following image(s) show garments. "
    "Produce one photorealistic image of the person in image 1 wearing the garments shown in "
    "the following images. Keep the person's identity, face, pose, body shape and the "
    "background of image 1; keep each garment's colour, pattern, fabric and cut, fitted "
    "naturally to the body."
)


def _one_line(text: str) -> str:
    # A user's value may not start a line of its own: that would forge an instruction line.
    return " ".join(str(text).split())


def build_prompt(kind: str, prompt: str, style: str = "", parameters: dict[str, str] | None = None) -> str:
    """The text sent to the model for one generation of `kind`.

    Parameters are appended as "key: value" lines. Reserved keys (images, prompt, model) are
    never honoured here, even though validation refuses them before this point.
    """
    parameters = dict(parameters or {})
    if not _one_line(style) and "style" in parameters:
        style = parameters.pop("style")  # used as the style: not repeated as a parameter line
    style = _one_line(style)
    prompt = prompt.strip()

    if kind == Kind.PHOTOGRAPHY.value:
        lines = [_PHOTOGRAPHY]
        if style:
            lines.append(f"Style and scene: {style}.")
    elif kind == Kind.FITTING.value:
        lines = [_FITTING]
        if style:
            lines.append(f"Setting: {style}.")
    else:
        raise InvalidRequest(f"unknown generation kind: {kind!r}")
    if prompt:
        lines.append(f"Instructions from the user: {prompt}")

    extra = [
        f"{_one_line(key)}: {_one_line(value)}"
        for key, value in parameters.items()
        if key.strip().lower() not in RESERVED_PARAMETER_KEYS and _one_line(key)
    ]
    if extra:
        lines.append("Additional parameters:")
        lines.extend(extra)
    return "\n".join(lines)
