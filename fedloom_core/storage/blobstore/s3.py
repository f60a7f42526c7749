"""Blob store on an S3 (or MinIO) bucket, with each object's sha256 in its metadata."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.exceptions import BotoCoreError, ClientError

# The hashing helpers are looked up on ``base`` when called, so a test can count them.
from fedloom_core.storage.blobstore import base
from fedloom_core.storage.blobstore.base import (
    CHUNK_SIZE,
    BlobInfo,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    validate_key,
)

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _verified(key: str, chunks: Iterator[bytes], expected: str) -> Iterator[bytes]:
    """Yield ``chunks`` while hashing them, and check the digest once they are exhausted."""
    digest = hashlib.sha256()
    try:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    base._check_digest(key, expected, digest.hexdigest())


class S3BlobStore(BlobStore):
    """Blob store on an S3 (or MinIO) bucket, with the sha256 kept in object metadata."""

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, create_bucket: bool = False
    ) -> None:
        """Use ``bucket`` under ``prefix``; create the bucket if missing only when ``create_bucket``."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url)
        if create_bucket:
            try:
                self.ping()
            except BlobNotFoundError:
                region = self.client.meta.region_name
                kwargs: dict[str, Any] = {"Bucket": bucket}
                if region and region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
                with self._errors(""):
                    self.client.create_bucket(**kwargs)

    def _object_key(self, key: str) -> str:
        """Map a validated blob key to its S3 object key."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Translate botocore errors into :class:`BlobStoreError` subclasses."""
        try:
            yield
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES:
                raise BlobNotFoundError(f"no blob under {key!r} in s3://{self.bucket}") from exc
            raise BlobStoreError(f"S3 error for {key!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 error for {key!r}: {exc}") from exc

    def put_file(self, key: str, path: str | Path) -> BlobInfo:
        """Hash the file in one streaming pass, then upload it with the digest as metadata."""
        object_key = self._object_key(key)
        self._forget(key)
        with open(path, "rb") as fh:
            size, sha = base._copy_hashing(fh, None)
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, object_key, ExtraArgs={"Metadata": {"sha256": sha}})
        return BlobInfo(key=key, size=size, sha256=sha)

    def put_stream(self, key: str, stream: BinaryIO) -> BlobInfo:
        """Spool ``stream`` to a temp file while hashing it, then upload the spool."""
        object_key = self._object_key(key)
        self._forget(key)
        with tempfile.TemporaryFile() as spool:
            size, sha = base._copy_hashing(stream, spool)  # type: ignore[arg-type]
            spool.seek(0)
            with self._errors(key):
                self.client.upload_fileobj(spool, self.bucket, object_key, ExtraArgs={"Metadata": {"sha256": sha}})
        return BlobInfo(key=key, size=size, sha256=sha)

    def info(self, key: str) -> BlobInfo:
        """Read size and digest from the object's headers."""
        object_key = self._object_key(key)
        with self._errors(key):
            head = self.client.head_object(Bucket=self.bucket, Key=object_key)
        sha = head.get("Metadata", {}).get("sha256")
        if not sha:
            raise BlobIntegrityError(f"blob {key!r} has no sha256 metadata")
        return BlobInfo(key=key, size=int(head["ContentLength"]), sha256=sha)

    def exists(self, key: str) -> bool:
        """Tell whether the object exists (a HEAD request)."""
        object_key = self._object_key(key)
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=object_key)
        except BlobNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        """Delete the object; a missing key is not an error."""
        object_key = self._object_key(key)
        self._forget(key)
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=object_key)

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """Keys of the objects under ``prefix``, a page of up to 1,000 at a time."""
        folder = self._object_key(prefix) + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
        with self._errors(prefix):
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][skip:], item["LastModified"].timestamp()

    def _get(self, key: str) -> tuple[Any, str]:
        """Start a GET and return the streaming body and the stored digest of that same object."""
        object_key = self._object_key(key)
        with self._errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
        sha = response.get("Metadata", {}).get("sha256")
        if not sha:
            response["Body"].close()
            raise BlobIntegrityError(f"blob {key!r} has no sha256 metadata")
        return response["Body"], sha

    @contextmanager
    def open_local(self, key: str, verify: bool = True) -> Iterator[Path]:
        """Download into a private temp dir while hashing, yield the file, then delete it.

        In a :meth:`read_once` block a checked download is kept (and yielded again) until the block ends.
        """
        seen = self._seen()
        if seen is not None and key in seen:
            yield seen[key]
            return
        body, sha = self._get(key)
        tmp_dir = Path(tempfile.mkdtemp(prefix="fedloom-blob-"))
        kept = False
        try:
            target = tmp_dir / key.rsplit("/", 1)[-1]
            digest = hashlib.sha256()
            try:
                with open(target, "wb") as out, self._errors(key):
                    for chunk in body.iter_chunks(CHUNK_SIZE):
                        digest.update(chunk)
                        out.write(chunk)
            finally:
                body.close()
            if verify:
                base._check_digest(key, sha, digest.hexdigest())
                if seen is not None:
                    seen[key], kept = target, True
            yield target
        finally:
            if not kept:
                shutil.rmtree(tmp_dir, ignore_errors=True)

    def _forget(self, key: str) -> None:
        """Drop this thread's kept download of ``key`` (it is being replaced or deleted)."""
        seen = self._seen()
        if seen is not None and key in seen:
            shutil.rmtree(seen.pop(key).parent, ignore_errors=True)

    def _end_reads(self, seen: dict[str, Any]) -> None:
        for path in seen.values():
            shutil.rmtree(path.parent, ignore_errors=True)

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream the object body in ``chunk_size`` pieces, verifying the digest at the end."""
        body, sha = self._get(key)

        def chunks() -> Iterator[bytes]:
            try:
                with self._errors(key):
                    yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return _verified(key, chunks(), sha)

    def ping(self) -> None:
        """Check that the bucket is reachable (HEAD bucket)."""
        with self._errors(""):
            self.client.head_bucket(Bucket=self.bucket)
