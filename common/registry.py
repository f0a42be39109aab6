"""The policy registry: immutable, numbered LoRA adapter versions over one frozen base model.

Each version holds the adapter's files (adapter_config.json, adapter_model.safetensors), its manifest
(manifest.json) and, after its canary, serving's verdict (verdict.json). Version "v0" is the base model
itself, with no adapter. The rules live here, once; where the bytes live is a store's business:
`DirectoryStore` (a directory every service mounts) or `common.registry_s3.S3Store` (any S3-compatible
object store), chosen by `open_registry` from the settings.

A version exists once its manifest exists, and the manifest is written last, so a reader sees a whole
version or none. Two publishers racing for one number cannot both take it: the loser takes the next.

What a version is never changes; what serving found of it does: its verdict, "promoted" or
"rolled_back", is replaced whole. A rolled-back version is never served by default again, and the
trainer does not train on from it. A manifest or verdict that does not parse (a disk error, a hand edit)
is logged and counted once (rlhf_registry_corrupt_total): the version is left out, or taken as having
no verdict, and nothing else fails.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter

from common.durable import fsync_dir, fsync_file, write_durably
from common.settings import SharedSettings

log = logging.getLogger(__name__)

BASE_VERSION = "v0"
MANIFEST = "manifest.json"
VERDICT = "verdict.json"
PROMOTED, ROLLED_BACK = "promoted", "rolled_back"

CORRUPT = Counter("rlhf_registry_corrupt_total", "Registry files found unusable and skipped: a version's "
                  "manifest or verdict that does not parse, or an adapter that fails its check.", ["what"])


def version_name(number: int) -> str:
    return f"v{number}"


def version_number(name: str) -> int:
    """'v12' -> 12. Raises ValueError on anything else."""
    if not name.startswith("v") or not name[1:].isdigit():
        raise ValueError(f"not a policy version: {name!r} (expected v<number>)")
    return int(name[1:])


@dataclass(frozen=True)
class PolicyVersion:
    number: int
    path: Path | None  # local files: None for the base model, and for a remote version not fetched yet
    manifest: dict
    verdict: dict | None = None  # serving's, after the canary: {"verdict": PROMOTED or ROLLED_BACK, ...}

    @property
    def name(self) -> str:
        return version_name(self.number)

    @property
    def is_base(self) -> bool:
        return self.number == 0

    @property
    def promoted(self) -> bool:
        return self.is_base or (self.verdict or {}).get("verdict") == PROMOTED

    @property
    def rolled_back(self) -> bool:
        return (self.verdict or {}).get("verdict") == ROLLED_BACK


BASE_POLICY = PolicyVersion(number=0, path=None, manifest={"version": BASE_VERSION})


def report_corrupt(what: str, name: str, problem: str) -> None:
    """One log line and one count for a registry file skipped as unusable."""
    CORRUPT.labels(what).inc()
    log.error("registry: %s of %s skipped: %s", what, name, problem)


class RegistryStore(Protocol):
    """Where a registry's bytes live. Versions are numbers here; the registry names them."""

    def numbers(self) -> list[int]:
        """The versions whose manifest exists, ascending."""

    def read(self, number: int, name: str) -> bytes | None:
        """The file `name` (MANIFEST or VERDICT) of version `number`; None if it does not exist."""

    def stage(self, adapter_dir: Path) -> str:
        """Store a copy of the adapter's files where no reader looks; returns a handle for `commit`."""

    def commit(self, staged: str, number: int, manifest: dict) -> bool:
        """Make the staged files version `number`, its manifest last; False if the number is taken."""

    def replace(self, number: int, name: str, data: bytes) -> None:
        """Replace the file `name` of version `number` atomically."""

    def local_dir(self, number: int, fetch: bool) -> Path | None:
        """A local directory with the version's files; with `fetch` False, None where that would download."""


class PolicyRegistry:
    def __init__(self, store: RegistryStore | Path | str):
        self._store = store if not isinstance(store, (Path, str)) else DirectoryStore(Path(store))
        self._reported: set[tuple[int, str, bytes]] = set()

    def publish(
        self,
        adapter_dir: Path,
        *,
        base_model: str,
        parent: str,
        metrics: dict[str, float],
        gate: list[str] | None = None,
        source: str | None = None,
    ) -> PolicyVersion:
        """Copy a saved PEFT adapter in as the next version and return it.

        `metrics` are the figures of the round that trained it; `gate` is what the trainer's evaluation
        gate found (one line per check, "pass ...", "fail ..." or "info ..."; empty: published without it).

        `source` names what produced the adapter (the trainer's round id); a version already published
        from the same source is returned instead of a second copy, so a publisher that crashed after
        publishing and runs again does not publish twice.
        """
        if source is not None and (existing := self.find(source)) is not None:
            return existing
        staged = self._store.stage(adapter_dir)
        number = self._latest_number() + 1
        while True:
            manifest = {
                "version": version_name(number),
                "base_model": base_model,
                "parent": parent,
                "source": source,
                "created_at": datetime.now(UTC).isoformat(),
                "metrics": metrics,
                "gate": list(gate or []),
            }
            if self._store.commit(staged, number, manifest):
                return self._version(number, fetch=False)
            number += 1

    def get(self, name: str) -> PolicyVersion:
        """The version called `name` ('v0' is the base model), its files local. Raises KeyError if unknown."""
        number = version_number(name)
        if number == 0:
            return BASE_POLICY
        version = self._version(number, fetch=True)
        if version is None:
            raise KeyError(name)
        return version

    def record_verdict(self, name: str, verdict: str, reason: str, figures: dict[str, float]) -> PolicyVersion:
        """Write serving's verdict on version `name` (replacing an earlier one) and return the version."""
        if verdict not in (PROMOTED, ROLLED_BACK):
            raise ValueError(f"unknown verdict {verdict!r}")
        number = version_number(name)
        if number == 0:
            raise ValueError("the base model has no verdict")
        if self._version(number, fetch=False) is None:
            raise KeyError(name)
        record = {"verdict": verdict, "reason": reason, "at": datetime.now(UTC).isoformat(), "figures": figures}
        self._store.replace(number, VERDICT, json.dumps(record, indent=2).encode())
        return self.get(name)

    def find(self, source: str) -> PolicyVersion | None:
        """The version published from `source`, if any."""
        return next((v for v in reversed(self.list()) if v.manifest.get("source") == source), None)

    def latest(self) -> PolicyVersion:
        """The newest version not rolled back (the base model if there is none)."""
        return next(v for v in reversed(self.list()) if not v.rolled_back)

    def latest_promoted(self) -> PolicyVersion:
        """The newest version serving promoted (the base model if there is none)."""
        return next(v for v in reversed(self.list()) if v.promoted)

    def list(self) -> list[PolicyVersion]:
        """Every version, oldest first. Their files are local only where that costs nothing: `get` fetches."""
        versions = (self._version(n, fetch=False) for n in self._store.numbers())
        return [BASE_POLICY] + [v for v in versions if v is not None]

    def _version(self, number: int, fetch: bool) -> PolicyVersion | None:
        name = version_name(number)
        manifest = self._parse(number, MANIFEST, lambda m: m.get("version") == name)
        if manifest is None:
            return None
        verdict = self._parse(number, VERDICT, _is_verdict)
        return PolicyVersion(number=number, path=self._store.local_dir(number, fetch), manifest=manifest,
                             verdict=verdict)

    def _parse(self, number: int, file: str, valid) -> dict | None:
        raw = self._store.read(number, file)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            if isinstance(record, dict) and valid(record):
                return record
            problem = "not the expected fields"
        except ValueError as exc:  # bad JSON or bad UTF-8
            problem = f"not JSON ({exc})"
        if (number, file, raw) not in self._reported:  # once per content, not on every read
            self._reported.add((number, file, raw))
            report_corrupt(file.removesuffix(".json"), version_name(number), problem)
        return None

    def _latest_number(self) -> int:
        numbers = self._store.numbers()
        return numbers[-1] if numbers else 0


def _is_verdict(record: dict) -> bool:
    return (record.get("verdict") in (PROMOTED, ROLLED_BACK) and isinstance(record.get("reason"), str)
            and isinstance(record.get("figures", {}), dict))


class DirectoryStore:
    """Versions in a local or mounted directory, every write fsynced before it counts:

        versions/000001/   adapter_config.json, adapter_model.safetensors, manifest.json, [verdict.json]
        staging/           half-written versions; never read

    A version directory appears by one atomic rename, and a rename cannot replace a directory with files in
    it, so two publishers racing for one number cannot overwrite each other.
    """

    def __init__(self, root: Path):
        self.root = root
        self._versions = root / "versions"
        self._staging = root / "staging"

    def numbers(self) -> list[int]:
        if not self._versions.is_dir():
            return []
        return sorted(int(p.name) for p in self._versions.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())

    def read(self, number: int, name: str) -> bytes | None:
        try:
            return (self._dir(number) / name).read_bytes()
        except FileNotFoundError:
            return None

    def stage(self, adapter_dir: Path) -> str:
        self._versions.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        staged = self._staging / uuid.uuid4().hex
        shutil.copytree(adapter_dir, staged)
        for directory, _, files in os.walk(staged):
            for file in files:
                fsync_file(Path(directory) / file)
            fsync_dir(Path(directory))
        return staged.name

    def commit(self, staged: str, number: int, manifest: dict) -> bool:
        staged_dir = self._staging / staged
        write_durably(staged_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
        try:
            os.rename(staged_dir, self._dir(number))
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return False
        fsync_dir(self._versions)
        fsync_dir(self._staging)
        return True

    def replace(self, number: int, name: str, data: bytes) -> None:
        write_durably(self._dir(number) / name, data)

    def local_dir(self, number: int, fetch: bool) -> Path:
        return self._dir(number)

    def _dir(self, number: int) -> Path:
        return self._versions / f"{number:06d}"


def open_registry(settings: SharedSettings) -> PolicyRegistry:
    """The registry the settings name: RLHF_REGISTRY_URL (s3://bucket/prefix) if set, else RLHF_REGISTRY_DIR."""
    if settings.registry_url:
        from common.registry_s3 import S3Store  # boto3 is imported only where an S3 registry is used

        return PolicyRegistry(S3Store(settings.registry_url, settings.registry_cache_dir))
    return PolicyRegistry(settings.registry_dir)
