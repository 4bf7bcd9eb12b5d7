"""/v1/uploads and /v1/files: a user's photos in, generated images out. Only the owner of
a file may read it; anyone else gets the same 404 as for a file that does not exist."""

from __future__ import annotations


import time
from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile

from atelier import deletion, works
from atelier.blobstore import THUMBNAIL_WIDTHS, BlobNotFound, InvalidBlobKey, content_type_of
from atelier.errors import BadImage
from atelier.images import store_image
from atelier.links import LinkRefused
from atelier.thumbnails import thumbnail
from starter import service
from starter.api.auth import current_user
from starter.api.context import ApiContext, context
from starter.api.errors import ApiError, not_found
from starter.api.schemas import ErrorResponse, Upload

router = APIRouter(tags=["files"], responses={s: {"model": ErrorResponse} for s in (401, 404, 413, 422)})

# Blob keys are content hashes: a key's bytes never change.
CACHE_CONTROL = "private, max-age=31536000, immutable"
IMAGE_CONTENT = {"schema": {"type": "string", "format": "binary"}}
IMAGE_RESPONSES = {
    200: {"description": "the image", "content": {t: IMAGE_CONTENT for t in ("image/jpeg", "image/png", "image/webp")}},
    304: {"description": "not modified (If-None-Match)"},
}
WIDTH_QUERY = Query(default=None, json_schema_extra={"enum": list(THUMBNAIL_WIDTHS)},
                    description="a thumbnail this many pixels wide (256, 512 or 1024; the image itself when it "
                                "is not wider)")


def _width(w: int | None) -> int | None:
    if w is not None and w not in THUMBNAIL_WIDTHS:
        raise ApiError(422, "InvalidRequest", f"w must be one of {', '.join(map(str, THUMBNAIL_WIDTHS))}")
    return w


@router.post("/v1/uploads", status_code=201, response_model=Upload, summary="Upload one image (multipart)",
             form_limits={"max_files": 1, "max_fields": 1},
             responses={400: {"model": ErrorResponse, "description": "not a multipart body with one file"}})
async def upload(
    file: UploadFile = File(description="one JPEG, PNG or WebP image"),
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> dict:
    cap = ctx.settings.max_download_bytes
    data = await file.read(cap + 1)
    if len(data) > cap:
        raise ApiError(413, "ContentTooLarge", f"the image is larger than {cap} bytes")
    try:
        # Checked and normalised exactly like a downloaded image, off the event loop.
        image = await store_image(ctx.blobs, data, max_side=ctx.settings.max_image_side,
                                  max_pixels=ctx.settings.max_image_pixels)
    except BadImage as err:
        raise ApiError(422, err.code, err.message) from None
    file_id = await works.record_upload(ctx.engine, user_id=user_id, image=image)
    if not ctx.blobs.exists(image.key):
        # Identical bytes of another holder were deleted between our store and our record: now that
        # the upload holds them, store them again (the same bytes give the same key).
        await store_image(ctx.blobs, data, max_side=ctx.settings.max_image_side,
                          max_pixels=ctx.settings.max_image_pixels)
    return {"file_id": file_id, "content_type": image.content_type, "width": image.width,
            "height": image.height, "size": image.size}


@router.delete("/v1/uploads/{file_id}", status_code=204, response_class=Response, summary="Delete an upload")
async def delete_upload(
    file_id: str,
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> Response:
    """The upload is gone at once, and with it the inputs of your finished generations that used
    it. A generation still running keeps its copy until it ends (then retention deletes it)."""
    deleted = await deletion.delete_upload(ctx.engine, ctx.blobs, user_id=user_id, file_id=file_id) \
        if len(file_id) <= 64 else None
    if deleted is None:
        raise not_found("no such upload")
    holders = await deletion.input_tasks_holding(ctx.engine, user_id=user_id, blob_key=deleted.blob_key)
    await deletion.release_inputs(ctx.engine, ctx.blobs, await service.closed_generations(ctx.client, holders))
    return Response(status_code=204)


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


async def _image(ctx: ApiContext, request: Request, key: str, width: int | None, cache_control: str) -> Response:
    etag = f'"{key.split(".", 1)[0]}{f"-w{width}" if width else ""}"'
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    try:
        data = await (thumbnail(ctx.blobs, key, width) if width else ctx.blobs.get(key))
    except BlobNotFound:
        raise not_found("no such file") from None
    return Response(data, media_type=content_type_of(key), headers={**headers, "X-Content-Type-Options": "nosniff"})


@router.get("/v1/files/{key}", response_class=Response, summary="Download an image you own",
            responses=IMAGE_RESPONSES)
async def get_file(
    key: str,
    request: Request,
    w: int | None = WIDTH_QUERY,
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> Response:
    try:
        content_type_of(key)
    except InvalidBlobKey:
        raise not_found("no such file") from None
    if not await works.owns_blob(ctx.engine, user_id=user_id, blob_key=key):
        raise not_found("no such file")
    return await _image(ctx, request, key, _width(w), CACHE_CONTROL)


@router.get(
    "/v1/images/{key}", response_class=Response, openapi_extra={"security": []},
    summary="Load an image through a signed link (no API key)",
    description="The links in `result.images[].url` and in works: signed (ATELIER_URL_SIGNING_SECRET) and "
                "valid for ATELIER_URL_TTL_S seconds. An altered or expired link answers 403; GET the "
                "generation or work again for a fresh one. Append `&w=256` (512, 1024) for a thumbnail.",
    responses={**IMAGE_RESPONSES, 403: {"model": ErrorResponse, "description": "altered or expired link"}},
)
async def get_signed_image(
    key: str,
    request: Request,
    owner: str = Query(default="", max_length=64, description="part of the signed link"),
    expires: str = Query(default="", max_length=12, description="part of the signed link: Unix time"),
    sig: str = Query(default="", max_length=64, description="part of the signed link: the HMAC"),
    w: int | None = WIDTH_QUERY,
    ctx: ApiContext = Depends(context),
) -> Response:
    if ctx.links is None:
        raise ApiError(403, "LinksDisabled",
                       "signed image links are disabled on this server (no ATELIER_URL_SIGNING_SECRET): "
                       "use /v1/files/{key} with your API key")
    try:
        content_type_of(key)
        ctx.links.verify(key, owner, expires, sig)
    except InvalidBlobKey:
        raise ApiError(403, "BadSignature", "this image link is malformed or was altered") from None
    except LinkRefused as refused:
        raise ApiError(403, refused.code, refused.message) from None
    # Deleted by its owner: the link dies with it, even if someone else holds the same bytes.
    if not await works.owns_blob(ctx.engine, user_id=owner, blob_key=key):
        raise not_found("no such file: it was deleted")
    remaining = max(0, int(expires) - int(time.time()))
    return await _image(ctx, request, key, _width(w), f"private, max-age={remaining}")
