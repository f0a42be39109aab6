"""Signed completion ids: what they carry comes back only from the exact id a key in use signed, within the
configured age; any other string is refused with InvalidCompletionId (never another exception), and
through /v1/feedback with a 404 (or 410 when expired)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat
import string
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.keys import local_key
from feedback import ChoiceRef
from serving.completion_ids import (
    PREFIX,
    CompletionIds,
    ExpiredCompletionId,
    InvalidCompletionId,
    ServedAnswer,
)
from serving.settings import ServingSettings

KEY, OTHER_KEY = "k" * 32, "o" * 32
DAY = 86400
T0 = 1_750_000_000
ALPHABET = string.ascii_letters + string.digits + "-_"


@pytest.fixture
def ids() -> CompletionIds:
    return CompletionIds(KEY, max_age_s=7 * DAY)


@pytest.mark.parametrize("versions", [["v0"], ["v3"] * 4, ["v12", "v13"], ["v13", "v12"], ["v1", "v2", "v2", "v1"]])
@pytest.mark.parametrize("routed", [False, True])
def test_round_trip(ids, versions, routed):
    completion_id = ids.issue(versions, issued_at=T0, routed=routed)
    assert completion_id.startswith(PREFIX)
    verified = ids.verify(completion_id, now=T0 + 60)
    assert (verified.versions, verified.issued_at, verified.routed) == (tuple(versions), T0, routed)
    assert verified.answer(len(versions) - 1) == ServedAnswer(versions[-1], routed, T0)


def test_format_1_ids_still_verify_as_not_routed(ids):
    """Ids issued before the flags byte: format 1, key id, issued at, nonce, number of choices, names."""
    key = KEY.encode()
    key_id = hmac.new(key, b"completion-id key id", hashlib.sha256).digest()[:4]
    raw = struct.pack(">B4sI8sB", 1, key_id, T0, b"12345678", 2) + b"v1,v2"
    payload = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    mac = hmac.new(key, f"{PREFIX}{payload}".encode(), hashlib.sha256).digest()
    old = f"{PREFIX}{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    verified = ids.verify(old, now=T0 + DAY)
    assert (verified.versions, verified.issued_at, verified.routed) == (("v1", "v2"), T0, False)
    with pytest.raises(ExpiredCompletionId):
        ids.verify(old, now=T0 + 8 * DAY)


def test_ids_are_unique_and_fit_a_feedback_reference(ids):
    assert len({ids.issue(["v1", "v2"], issued_at=T0) for _ in range(10_000)}) == 10_000
    for versions in (["v0"] * 128, ["v123456", "v123457", "v123458", "v123459"]):
        ChoiceRef(completion_id=ids.issue(versions, routed=True))  # within ChoiceRef's max_length


def test_every_altered_character_is_refused(ids):
    completion_id = ids.issue(["v12", "v13"], issued_at=T0, routed=True)  # the flag is signed too
    for position, original in enumerate(completion_id):
        for replacement in ALPHABET + ".=+/ \x00é":
            if replacement != original:
                altered = completion_id[:position] + replacement + completion_id[position + 1:]
                with pytest.raises(InvalidCompletionId):
                    ids.verify(altered, now=T0)


def test_truncated_or_extended_ids_are_refused(ids):
    completion_id = ids.issue(["v1"], issued_at=T0)
    for end in range(len(completion_id)):
        with pytest.raises(InvalidCompletionId):
            ids.verify(completion_id[:end], now=T0)
    for suffix in ("A", "=", "==", " ", "\n", ".x"):
        with pytest.raises(InvalidCompletionId):
            ids.verify(completion_id + suffix, now=T0)


def test_another_key_is_refused(ids):
    with pytest.raises(InvalidCompletionId, match="not issued by this service"):
        ids.verify(CompletionIds(OTHER_KEY).issue(["v1"], issued_at=T0), now=T0)


def test_rotation_accepts_the_previous_key_and_signs_with_the_new():
    old = CompletionIds(OTHER_KEY)
    rotated = CompletionIds(KEY, previous_key=OTHER_KEY)
    assert rotated.verify(old.issue(["v4"], issued_at=T0), now=T0).versions == ("v4",)
    fresh = rotated.issue(["v5"], issued_at=T0)
    assert CompletionIds(KEY).verify(fresh, now=T0).versions == ("v5",)
    with pytest.raises(InvalidCompletionId):  # once the old key is dropped, its ids are refused
        CompletionIds(KEY).verify(old.issue(["v4"], issued_at=T0), now=T0)


def test_expiry(ids):
    completion_id = ids.issue(["v1"], issued_at=T0)
    assert ids.verify(completion_id, now=T0 + 7 * DAY).versions == ("v1",)
    with pytest.raises(ExpiredCompletionId, match="7.0 days ago; feedback is accepted for 7 days"):
        ids.verify(completion_id, now=T0 + 7 * DAY + 1)
    with pytest.raises(InvalidCompletionId):  # a forged id is refused as forged, however old
        CompletionIds(OTHER_KEY).verify(completion_id, now=T0 + 30 * DAY)


@pytest.mark.parametrize("key, previous", [("short", None), (KEY, "short"), (KEY, KEY)])
def test_weak_or_repeated_keys_are_refused_at_start(key, previous):
    with pytest.raises(ValueError):
        CompletionIds(key, previous_key=previous)


@given(st.text(max_size=200))
def test_any_string_is_refused_cleanly(text):
    with pytest.raises(InvalidCompletionId):
        CompletionIds(KEY).verify(text)


@given(st.text(ALPHABET, max_size=120), st.text(ALPHABET, min_size=43, max_size=43))
def test_well_shaped_garbage_is_refused_cleanly(payload, mac):
    with pytest.raises(InvalidCompletionId):
        CompletionIds(KEY).verify(f"{PREFIX}{payload}.{mac}")


def test_local_key_is_made_once_private_and_shared(tmp_path):
    path = tmp_path / "var" / "completion-key"
    key = local_key(path)
    assert len(key) >= 32 and local_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(path.parent.iterdir()) == [path]  # nothing staged is left behind
    first, second = CompletionIds(local_key(path)), CompletionIds(local_key(path))
    assert second.verify(first.issue(["v1"])).versions == ("v1",)


def test_configured_key_wins_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVING_COMPLETION_KEY", KEY)
    from_env = CompletionIds.from_settings(ServingSettings(completion_key_file=tmp_path / "unused"))
    assert CompletionIds(KEY).verify(from_env.issue(["v1"])).versions == ("v1",)
    assert not (tmp_path / "unused").exists()


# --- Through /v1/feedback ------------------------------------------------------------------------


def _thumbs(client, completion_id: str):
    return client.post("/v1/feedback", json={"type": "thumbs", "completion_id": completion_id, "rating": "up"})


def test_forged_id_is_404_and_expired_id_is_410(client, settings, events):
    served = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 2}).json()["id"]
    forged = CompletionIds(OTHER_KEY).issue(["v0"])
    response = _thumbs(client, forged)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["param"] == "completion_id"
    assert "not issued by this service" in response.json()["error"]["message"]

    signer = CompletionIds.from_settings(settings)  # the app's own key: an id it issued 8 days ago
    response = _thumbs(client, signer.issue(["v0"], issued_at=signer.verify(served).issued_at - 8 * DAY))
    assert response.status_code == 410, response.text
    assert response.json()["error"]["code"] == "completion_expired"
    assert events.feedback == []
    assert _thumbs(client, served).status_code == 202
