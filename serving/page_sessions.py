"""Session tokens for the end-user page: with authentication on, the page holds no app key, so serving gives
it a short-lived token of its own (POST /page/session) that opens the app routes (chat, models, feedback)
and never the admin ones.

`page.<issued at>.<nonce>.<mac>`: the mac is HMAC-SHA256 under the completion id key (every replica has it,
so any replica accepts a token another minted) over a message of its own prefix, which no completion id's
mac ever covers. A token expires `ttl_s` after it was minted; the page fetches a new one when refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time

from common.keys import configured_key
from serving.settings import ServingSettings

PREFIX = "page."
_SHAPE = re.compile(r"page\.(\d{1,12})\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")


class PageSessions:
    def __init__(self, key: str, previous_key: str | None = None, ttl_s: float = 3600):
        self._keys = [k.encode() for k in (key, previous_key) if k]
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> PageSessions:
        previous = settings.completion_previous_key
        return cls(configured_key(settings.completion_key, settings.completion_key_file),
                   previous.get_secret_value() if previous else None, settings.page_session_ttl_s)

    def issue(self, now: float | None = None) -> str:
        body = f"{int(time.time() if now is None else now)}.{secrets.token_hex(8)}"
        return f"{PREFIX}{body}.{self._mac(self._keys[0], body)}"

    def valid(self, token: str | None, now: float | None = None) -> bool:
        """Minted by a replica of this service (under the current or previous key) and not expired."""
        shape = _SHAPE.fullmatch(token or "")
        if shape is None:
            return False
        issued_at, nonce, mac = shape.groups()
        body = f"{issued_at}.{nonce}"
        if not any([hmac.compare_digest(mac.encode(), self._mac(key, body).encode()) for key in self._keys]):
            return False
        return (time.time() if now is None else now) - int(issued_at) <= self.ttl_s

    @staticmethod
    def _mac(key: bytes, body: str) -> str:
        digest = hmac.new(key, f"page-session\0{body}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
