"""Who may call what (SERVING_AUTH).

'keys', the default: the app routes take an app key, the admin key, or the end-user page's session token
(serving/page_sessions.py); the admin routes take the admin key alone, never an app key. 'local': nothing
is checked, for a stack on one machine (`make up`); serving says so loudly at start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from fastapi import Request

from serving.errors import APIError
from serving.page_sessions import PREFIX as PAGE_PREFIX
from serving.settings import ServingSettings

log = logging.getLogger(__name__)


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, keys: list[str]) -> bool:
    # Compare every key in constant time, so that timing does not tell how much of a key was right.
    return token is not None and any([hmac.compare_digest(token.encode(), key.encode()) for key in keys])


def _local(request: Request) -> bool:
    return request.app.state.settings.auth == "local"


async def require_api_key(request: Request) -> None:
    if _local(request):
        return
    token = _bearer(request)
    if _matches(token, request.app.state.settings.api_keys + _admin(request)):
        return
    if request.app.state.settings.page and request.app.state.page_sessions.valid(token):
        return
    raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                   type="authentication_error", code="invalid_api_key")


async def require_admin_key(request: Request) -> None:
    if _local(request):
        return
    if not _matches(_bearer(request), _admin(request)):
        raise APIError(403 if _bearer(request) else 401, "this endpoint needs the admin key",
                       type="permission_error", code="admin_key_required")


def is_admin(request: Request) -> bool:
    """Whether a request carries the admin key (an operator's, when one is set)."""
    return _matches(_bearer(request), _admin(request))


def key_id(request: Request) -> str | None:
    """Which app key (or page session) sent a request, as a digest that names it without revealing it; None
    in local mode (any bearer token then proves nothing)."""
    token = _bearer(request)
    if _local(request) or token is None:
        return None
    kind = "page" if token.startswith(PAGE_PREFIX) else "key"
    return f"{kind}-" + hashlib.sha256(token.encode()).hexdigest()[:16]


def announce_mode(settings: ServingSettings) -> None:
    if settings.auth == "local":
        log.warning("SERVING_AUTH=local: NO AUTHENTICATION. Anyone who can reach %s:%d can call every route, "
                    "the admin routes included. Outside one machine use SERVING_AUTH=keys.",
                    settings.host, settings.port)
    else:
        log.info("authentication on: %d app key(s), a separate admin key%s", len(settings.api_keys),
                 ", page session tokens" if settings.page else "")


def _admin(request: Request) -> list[str]:
    key = request.app.state.settings.admin_key
    return [key] if key else []
