"""Every pattern that guards input matches the whole input (issue 10 #6): `$` also matches
before a final newline, so `re.match(r"^...$")` let "key.jpg\\n" through, and str.isdigit
takes "²", which int() then refuses. Each guard is fed the near-misses."""

from __future__ import annotations

import pytest

from atelier.blobstore import BlobStore, InvalidBlobKey, content_type_of
from atelier.errors import ProviderRejected
from atelier.links import LinkRefused, LinkSigner
from atelier.providers.base import GenerationInput
from atelier.providers.gemini import GeminiProvider
from starter.service import generations_query

KEY = "a" * 64 + ".jpg"
NEAR_MISSES = ["\n", "\r\n", "\x00", " ", "\u2028"]


@pytest.mark.parametrize("tail", NEAR_MISSES)
def test_blob_keys_with_anything_after_them_are_refused(tail: str, tmp_path) -> None:
    assert content_type_of(KEY) == "image/jpeg"
    with pytest.raises(InvalidBlobKey):
        content_type_of(KEY + tail)
    with pytest.raises(InvalidBlobKey):
        BlobStore(tmp_path).path(KEY + tail)


@pytest.mark.parametrize("expires", ["²", "١٢٣", "12\n", "+12", " 12", "1" * 13])
def test_signed_links_refuse_expiry_times_that_are_not_ascii_digits(expires: str) -> None:
    signer = LinkSigner(secret=b"s" * 32, ttl_s=60)
    with pytest.raises(LinkRefused) as refused:
        signer.verify(KEY, "usr_1", expires, "A" * 43)
    assert refused.value.code == "BadSignature"


@pytest.mark.parametrize("tail", NEAR_MISSES)
def test_visibility_queries_refuse_values_with_a_trailing_newline(tail: str) -> None:
    assert "usr_1" in generations_query("usr_1")
    with pytest.raises(ValueError):
        generations_query("usr_1" + tail)


@pytest.mark.parametrize("tail", ["\n", "/../x", " "])
async def test_gemini_model_names_with_a_trailing_newline_are_refused_before_any_call(tail: str) -> None:
    import httpx

    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no call may be made, got {request.url}")

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        provider = GeminiProvider(client, None, api_key="k", base_url="http://gemini.test", timeout_s=5)
        with pytest.raises(ProviderRejected, match="invalid Gemini model name"):
            await provider.generate(GenerationInput(kind="photography", model="gemini-x" + tail, prompt="",
                                                    images=[]))
