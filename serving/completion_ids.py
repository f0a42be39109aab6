"""Completion ids that carry what feedback on them needs, signed: any replica, before or after a restart,
checks feedback on any completion any replica served, with nothing remembered.

`chatcmpl-<payload>.<mac>`, both parts unpadded url-safe base64. The payload packs a format byte, a flags
byte (bit 0: serving routed the request by the canary's rules, so its answers are evidence in the canary's
trial on any replica), the key id, the issue time (unix seconds), a random nonce (so every id is unique)
and the version that wrote each choice: one name when all choices share it, else one name per choice,
comma-separated. Format 1 ids (no flags byte) still verify, as not routed, until they expire. The mac is
HMAC-SHA256 over the payload's text under a key every replica shares; it is compared as text, so no other
spelling of an id (another base64 of the same bytes) ever verifies: the id is also the key that joins
feedback to its completion downstream.

Rotation: a current key signs; ids signed by the previous key still verify until they expire. The key id
is derived from the key (a fingerprint), so rotating means setting two keys and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.keys import configured_key

if TYPE_CHECKING:  # the settings import the canary, whose evidence reads these ids
    from serving.settings import ServingSettings

PREFIX = "chatcmpl-"
_FORMAT = 2
_HEADERS = {  # format -> its header
    1: struct.Struct(">B4sI8sB"),  # format, key id, issued at, nonce, number of choices
    2: struct.Struct(">BB4sI8sB"),  # format, flags, key id, issued at, nonce, number of choices
}
_ROUTED = 0x01
_SHAPE = re.compile(rf"{PREFIX}([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{{43}})")
MIN_KEY_LENGTH = 32

log = logging.getLogger(__name__)


class InvalidCompletionId(Exception):
    """Not an id this service issued: garbage, truncated, altered, forged, or signed by an unknown key."""


class ExpiredCompletionId(Exception):
    """An id this service issued, older than the configured maximum age."""


@dataclass(frozen=True)
class ServedAnswer:
    """One choice of a completion, as its verified id tells it."""

    version: str  # the version that wrote it
    routed: bool  # served by the canary's rules: neither pinned to a version nor an operator's request
    issued_at: int  # unix seconds


@dataclass(frozen=True)
class VerifiedCompletion:
    versions: tuple[str, ...]  # the version that wrote each choice
    issued_at: int  # unix seconds
    routed: bool

    def answer(self, choice_index: int) -> ServedAnswer:
        return ServedAnswer(self.versions[choice_index], self.routed, self.issued_at)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key_id(key: bytes) -> bytes:
    return hmac.new(key, b"completion-id key id", hashlib.sha256).digest()[:4]


class CompletionIds:
    def __init__(self, key: str, previous_key: str | None = None, max_age_s: float = 7 * 24 * 3600):
        keys = [k.encode() for k in (key, previous_key) if k is not None]
        if any(len(k) < MIN_KEY_LENGTH for k in keys):
            raise ValueError(f"a completion id key needs at least {MIN_KEY_LENGTH} characters")
        self._current = keys[0]
        self._keys = {_key_id(k): k for k in keys}
        if len(self._keys) != len(keys):
            raise ValueError("the current and previous completion id keys must differ")
        self._max_age_s = max_age_s

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> CompletionIds:
        if not settings.completion_key:
            log.info("completion ids signed with the local key in %s: replicas on other hosts need "
                     "SERVING_COMPLETION_KEY", settings.completion_key_file)
        key = configured_key(settings.completion_key, settings.completion_key_file)
        previous = settings.completion_previous_key
        return cls(key, previous.get_secret_value() if previous else None, settings.completion_id_max_age_s)

    def issue(self, versions: list[str], issued_at: int | None = None, routed: bool = False) -> str:
        """A new id for a completion whose choice i `versions[i]` writes; `routed`: see ServedAnswer."""
        if not versions or any(not v or "," in v for v in versions):
            raise ValueError(f"not a list of version names: {versions!r}")
        names = versions[:1] if len(set(versions)) == 1 else versions
        issued_at = int(time.time()) if issued_at is None else issued_at
        header = _HEADERS[_FORMAT].pack(_FORMAT, _ROUTED if routed else 0, _key_id(self._current), issued_at,
                                        secrets.token_bytes(8), len(versions))
        payload = _b64(header + ",".join(names).encode())
        return f"{PREFIX}{payload}.{self._mac(self._current, payload)}"

    def verify(self, completion_id: str, now: float | None = None) -> VerifiedCompletion:
        """What the id says, once its signature checks; raise InvalidCompletionId or ExpiredCompletionId."""
        shape = _SHAPE.fullmatch(completion_id)
        if shape is None:
            raise _forged(completion_id)
        payload, mac = shape.groups()
        try:
            raw = _unb64(payload)
            header = _HEADERS[raw[0]]
            _fmt, *flags, key_id, issued_at, _nonce, n = header.unpack_from(raw)  # format 1: no flags
            names = raw[header.size:].decode().split(",")
        except (binascii.Error, struct.error, UnicodeDecodeError, IndexError, KeyError):
            raise _forged(completion_id) from None
        key = self._keys.get(key_id)
        if key is None or not hmac.compare_digest(mac, self._mac(key, payload)):
            raise _forged(completion_id)
        # Signed by us, so well formed unless a future format reached an older replica.
        if n < 1 or len(names) not in (1, n):
            raise _forged(completion_id)
        age = (time.time() if now is None else now) - issued_at
        if age > self._max_age_s:
            raise ExpiredCompletionId(f"completion {completion_id!r} was served {age / 86400:.1f} days ago; "
                                      f"feedback is accepted for {self._max_age_s / 86400:g} days")
        return VerifiedCompletion(tuple(names * n if len(names) == 1 else names), issued_at,
                                  routed=any(f & _ROUTED for f in flags))

    @staticmethod
    def _mac(key: bytes, payload: str) -> str:
        return _b64(hmac.new(key, f"{PREFIX}{payload}".encode(), hashlib.sha256).digest())


def _forged(completion_id: str) -> InvalidCompletionId:
    # Built only when raised: verify() runs on every piece of feedback.
    return InvalidCompletionId(f"completion {completion_id!r} was not issued by this service "
                               "(unknown, altered or forged id)")
