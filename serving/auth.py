"""Bearer-key checks: app keys for the API, a separate admin key for changing the served policy."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from serving.errors import APIError


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, keys: list[str]) -> bool:
    # Compare every key in constant time, so that timing does not tell how much of a key was right.
    return token is not None and any([hmac.compare_digest(token.encode(), key.encode()) for key in keys])


async def require_api_key(request: Request) -> None:
    keys = request.app.state.settings.api_keys
    if keys and not _matches(_bearer(request), keys + _admin(request)):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type="authentication_error", code="invalid_api_key")


async def require_admin_key(request: Request) -> None:
    settings = request.app.state.settings
    if settings.admin_key is None:
        return await require_api_key(request)
    if not _matches(_bearer(request), [settings.admin_key]):
        raise APIError(403 if _bearer(request) else 401, "this endpoint needs the admin key",
                       type="permission_error", code="admin_key_required")


def is_admin(request: Request) -> bool:
    """Whether a request carries the admin key (an operator's, when one is set)."""
    return _matches(_bearer(request), _admin(request))


def key_id(request: Request) -> str | None:
    """Which app key sent a request, as a digest that names the key without revealing it; None when the API
    needs no key (any bearer token then proves nothing)."""
    token = _bearer(request)
    if not request.app.state.settings.api_keys or token is None:
        return None
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _admin(request: Request) -> list[str]:
    key = request.app.state.settings.admin_key
    return [key] if key else []


