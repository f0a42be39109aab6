"""The policy registry's versions in an S3-compatible object store (AWS S3, MinIO, Ceph, moto's server).

    <prefix>versions/000001/manifest.json   the version exists once this exists
    <prefix>versions/000001/verdict.json    serving's verdict, replaced whole by a PUT
    <prefix>objects/<upload id>/...         the adapter's files, uploaded before the manifest names them

A publisher uploads the adapter's files under an id of its own, then creates the manifest with a
conditional PUT (If-None-Match: *): of two publishers racing for one number exactly one succeeds, and the
loser tries the next number with the files it already uploaded; neither can overwrite the other's files.
A store that ignores If-None-Match (older MinIO and Ceph releases) loses this guarantee: the last
manifest written wins. Files of a publisher that died before its manifest stay under objects/ unused.

Serving and the trainer load adapters from local files: `local_dir` downloads a version once into the
cache directory (into a temporary directory, then one rename), and versions never change, so a cached
copy stays valid.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError

from common.registry import MANIFEST

_MANIFEST_KEY = re.compile(rf"versions/(\d{{6}})/{re.escape(MANIFEST)}$")


class S3Store:
    def __init__(self, url: str, cache_dir: Path, client=None):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"registry URL {url!r} is not s3://bucket[/prefix]")
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.cache = Path(cache_dir) / self.bucket / self.prefix
        # Endpoint, region and credentials: boto3's usual sources (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
        self._client = client or boto3.client("s3")
        self._manifests: dict[int, bytes] = {}  # a manifest never changes once written

    def numbers(self) -> list[int]:
        numbers = []
        for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}versions/"):
            for item in page.get("Contents", []):
                if match := _MANIFEST_KEY.search(item["Key"]):
                    numbers.append(int(match.group(1)))
        return sorted(numbers)

    def read(self, number: int, name: str) -> bytes | None:
        if name == MANIFEST and number in self._manifests:
            return self._manifests[number]
        try:
            data = self._client.get_object(Bucket=self.bucket, Key=self._key(number, name))["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        if name == MANIFEST:
            self._manifests[number] = data
        return data

    def stage(self, adapter_dir: Path) -> str:
        upload = uuid.uuid4().hex
        for path in sorted(p for p in Path(adapter_dir).rglob("*") if p.is_file()):
            relative = path.relative_to(adapter_dir).as_posix()
            self._client.upload_file(str(path), self.bucket, f"{self.prefix}objects/{upload}/{relative}")
        return upload

    def commit(self, staged: str, number: int, manifest: dict) -> bool:
        body = json.dumps({**manifest, "objects": f"objects/{staged}/"}, indent=2).encode()
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(number, MANIFEST), Body=body,
                                    IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False  # another publisher took this number
            raise
        return True

    def replace(self, number: int, name: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(number, name), Body=data)

    def local_dir(self, number: int, fetch: bool) -> Path | None:
        target = self.cache / f"{number:06d}"
        if target.is_dir() or not fetch:
            return target if target.is_dir() else None
        manifest = self.read(number, MANIFEST)
        objects = f"{self.prefix}{json.loads(manifest)['objects']}"
        self.cache.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix=f".{number:06d}.", dir=self.cache))
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=objects):
                for item in page.get("Contents", []):
                    path = download / item["Key"].removeprefix(objects)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._client.download_file(self.bucket, item["Key"], str(path))
            (download / MANIFEST).write_bytes(manifest)
            download.rename(target)
        except OSError:
            if not target.is_dir():  # not a replica fetching the same version first: a real failure
                raise
        finally:
            shutil.rmtree(download, ignore_errors=True)
        return target

    def _key(self, number: int, name: str) -> str:
        return f"{self.prefix}versions/{number:06d}/{name}"
