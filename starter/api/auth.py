"""Who is calling. Users: `Authorization: Bearer <api key>`, looked up by the key's hash.
Operators: the same header carrying ATELIER_ADMIN_TOKEN, compared in constant time.

A key found in the database is remembered (see keycache), so most requests cost no
database round trip to authenticate.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from atelier import users
from starter.api.context import ApiContext, context
from starter.api.errors import ApiError

api_key_scheme = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                            description="a user's API key (from POST /v1/admin/users)")
admin_scheme = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="ATELIER_ADMIN_TOKEN")

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "Unauthorized", message, headers=_CHALLENGE)


async def current_user(
    credentials: HTTPAuthorizationCredentials | None = Security(api_key_scheme),
    ctx: ApiContext = Depends(context),
) -> str:
    """The caller's user id; 401 for a missing, malformed, unknown or revoked key."""
    if credentials is None:
        raise _unauthorized("send your API key as 'Authorization: Bearer <key>'")
    key_hash = users.hash_key(credentials.credentials)
    user_id = await ctx.keys.resolve(key_hash, lambda: users.user_for_key(ctx.engine, credentials.credentials))
    if user_id is None:
        raise _unauthorized("unknown or revoked API key")
    return user_id


async def require_admin(
    credentials: HTTPAuthorizationCredentials | None = Security(admin_scheme),
    ctx: ApiContext = Depends(context),
) -> None:
    token = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else ""
    if not token:
        raise ApiError(403, "AdminDisabled",
                       "admin routes are disabled on this server: set ATELIER_ADMIN_TOKEN to enable them")
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        raise _unauthorized("missing or wrong admin token")
