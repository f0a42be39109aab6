"""Shared secrets read one way by both services: from a setting (the environment, a SecretStr), else from a
key file under var/ made on first use, so that processes started from one directory (`make up`, tests)
agree without configuration. Deployments set the variables: each host would otherwise make its own key.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from pydantic import SecretStr

from common.settings import SharedSettings

log = logging.getLogger(__name__)


def local_key(path: Path) -> str:
    """The key kept in `path`, made (random, readable by its owner only) on first use. Processes started
    from the same directory share it; two creating it at once agree on whichever linked it first."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            try:
                os.link(staged, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(staged)
    return path.read_text().strip()


def configured_key(secret: SecretStr | None, local_file: Path) -> str:
    """`secret` when it is set, else the key in `local_file`."""
    return secret.get_secret_value() if secret else local_key(local_file)


def policy_signing_key(settings: SharedSettings) -> str:
    """The key that signs policy announcements (feedback.PolicyEvent.signed)."""
    if settings.policy_signing_key is None:
        log.info("policy announcements signed with the local key in %s: processes on other hosts need "
                 "RLHF_POLICY_SIGNING_KEY", settings.policy_signing_key_file)
    return configured_key(settings.policy_signing_key, settings.policy_signing_key_file)


def policy_signing_keys(settings: SharedSettings) -> list[str]:
    """The keys a policy announcement may be signed by: the current one, and the previous one while a
    rotation is under way."""
    previous = settings.policy_signing_previous_key
    return [policy_signing_key(settings)] + ([previous.get_secret_value()] if previous else [])
