"""The policy registry: immutable, numbered LoRA adapter versions over one frozen base model.

Layout under the root:
    versions/000001/   adapter_config.json, adapter_model.safetensors, manifest.json, [verdict.json]
    staging/           half-written versions; never read

A version directory appears by one atomic rename, so a reader sees a whole version or none, and two
publishers racing for the same number cannot overwrite each other (the loser takes the next number).
Version "v0" is the base model itself, with no adapter.

What a version is never changes; what serving found of it does: after its canary, serving writes a
verdict beside the manifest, "promoted" or "rolled_back". A rolled-back version is never served by
default again, and the trainer does not train on from it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

BASE_VERSION = "v0"
MANIFEST = "manifest.json"
VERDICT = "verdict.json"
PROMOTED, ROLLED_BACK = "promoted", "rolled_back"


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
    path: Path | None  # None for the base model
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


class PolicyRegistry:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._versions = self.root / "versions"
        self._staging = self.root / "staging"

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
        self._versions.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        staged = self._staging / uuid.uuid4().hex
        shutil.copytree(adapter_dir, staged)
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
            (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
            try:
                os.rename(staged, self._dir(number))
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                number += 1
                continue
            return PolicyVersion(number=number, path=self._dir(number), manifest=manifest)

    def get(self, name: str) -> PolicyVersion:
        """The version called `name` ('v0' is the base model). Raises KeyError if unknown."""
        number = version_number(name)
        if number == 0:
            return BASE_POLICY
        path = self._dir(number)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise KeyError(name)
        verdict_path = path / VERDICT
        verdict = json.loads(verdict_path.read_text()) if verdict_path.is_file() else None
        return PolicyVersion(number=number, path=path, manifest=json.loads(manifest_path.read_text()),
                             verdict=verdict)

    def record_verdict(self, name: str, verdict: str, reason: str, figures: dict[str, float]) -> PolicyVersion:
        """Write serving's verdict on version `name` (replacing an earlier one) and return the version."""
        if verdict not in (PROMOTED, ROLLED_BACK):
            raise ValueError(f"unknown verdict {verdict!r}")
        version = self.get(name)
        if version.is_base:
            raise ValueError("the base model has no verdict")
        record = {"verdict": verdict, "reason": reason, "at": datetime.now(UTC).isoformat(), "figures": figures}
        staged = version.path / f".{VERDICT}.{uuid.uuid4().hex}"
        staged.write_text(json.dumps(record, indent=2))
        os.replace(staged, version.path / VERDICT)  # readers see the old verdict or the new one, whole
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
        return [BASE_POLICY] + [self.get(version_name(n)) for n in self._numbers()]

    def _dir(self, number: int) -> Path:
        return self._versions / f"{number:06d}"

    def _numbers(self) -> list[int]:
        if not self._versions.is_dir():
            return []
        return sorted(int(p.name) for p in self._versions.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())

    def _latest_number(self) -> int:
        numbers = self._numbers()
        return numbers[-1] if numbers else 0
