"""/v1/uploads and /v1/files: a user's photos in, generated images out. Only the owner of
a file may read it; anyone else gets the same 404 as for a file that does not exist."""

from __future__ import annotations


from fastapi import APIRouter, Depends, File, Request, Response, UploadFile

from atelier import works
from atelier.blobstore import BlobNotFound, InvalidBlobKey, content_type_of
from atelier.errors import BadImage
from atelier.images import store_image
from starter.api.auth import current_user
from starter.api.context import ApiContext, context
from starter.api.errors import ApiError, not_found
from starter.api.schemas import ErrorResponse, Upload

router = APIRouter(tags=["files"], responses={s: {"model": ErrorResponse} for s in (401, 404, 413, 422)})

# Blob keys are content hashes: a key's bytes never change.
CACHE_CONTROL = "private, max-age=31536000, immutable"
IMAGE_CONTENT = {"schema": {"type": "string", "format": "binary"}}


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
    return {"file_id": file_id, "content_type": image.content_type, "width": image.width,
            "height": image.height, "size": image.size}


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


@router.get(
    "/v1/files/{key}", response_class=Response, summary="Download an image you own",
    responses={200: {"description": "the image", "content": {t: IMAGE_CONTENT for t in
                                                            ("image/jpeg", "image/png", "image/webp")}},
               304: {"description": "not modified (If-None-Match)"}},
)
async def get_file(
    key: str,
    request: Request,
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> Response:
    try:
        content_type = content_type_of(key)
    except InvalidBlobKey:
        raise not_found("no such file") from None
    if not await works.owns_blob(ctx.engine, user_id=user_id, blob_key=key):
        raise not_found("no such file")
    etag = f'"{key.split(".", 1)[0]}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    try:
        data = await ctx.blobs.get(key)
    except BlobNotFound:
        raise not_found("no such file") from None
    return Response(data, media_type=content_type, headers={**headers, "X-Content-Type-Options": "nosniff"})
