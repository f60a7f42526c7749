"""Model blob store: sha256-verified storage of model and update files on a local directory or S3.

Every blob's sha256 is computed in the same streaming pass that writes it and stored with the blob:
the local backend keeps it in a sidecar file ``<file>.sha256`` written after the data, which also acts
as the commit marker (a blob exists only once its sidecar does); the S3 backend keeps it in the object
metadata ``sha256``. :meth:`BlobStore.open_local` checks the digest and raises
:class:`BlobIntegrityError` on a mismatch; :meth:`BlobStore.iter_bytes` checks it at the end of the
stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from fedloom_core.storage.blobstore.base import (
    CHUNK_SIZE,
    MAX_KEY_LENGTH,
    SIDECAR_SUFFIX,
    BlobInfo,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    InvalidBlobKeyError,
    validate_key,
)
from fedloom_core.storage.blobstore.local import LocalBlobStore

# The S3 backend (boto3, ~35 MB of RSS) is imported when first named: a server on the local store never loads it.
if TYPE_CHECKING:
    from fedloom_core.storage.blobstore.s3 import S3BlobStore

__all__ = [
    "CHUNK_SIZE",
    "MAX_KEY_LENGTH",
    "SIDECAR_SUFFIX",
    "BlobInfo",
    "BlobIntegrityError",
    "BlobNotFoundError",
    "BlobStore",
    "BlobStoreError",
    "InvalidBlobKeyError",
    "LocalBlobStore",
    "S3BlobStore",
    "open_blob_store",
    "validate_key",
]


def __getattr__(name: str) -> Any:
    if name == "S3BlobStore":
        from fedloom_core.storage.blobstore.s3 import S3BlobStore

        return S3BlobStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_blob_store(blob_url: str, s3_endpoint_url: str | None = None) -> BlobStore:
    """Open the store named by ``file:///abs/path`` or ``s3://bucket/prefix``."""
    parsed = urlparse(blob_url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"blob URL must be file:///absolute/path, got {blob_url!r}")
        return LocalBlobStore(parsed.path)
    if parsed.scheme == "s3" and parsed.netloc:
        from fedloom_core.storage.blobstore.s3 import S3BlobStore

        return S3BlobStore(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url, create_bucket=True)
    raise ValueError(f"blob URL must be file:///abs/path or s3://bucket[/prefix], got {blob_url!r}")
