"""Process settings, read from ``FEDLOOM_*`` environment variables and validated at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedloom_core.contracts import AGGREGATION_TASK_QUEUE, WORKFLOW_TASK_QUEUE  # noqa: F401 - re-exported

DEFAULT_DATA_DIR = Path("./.fedloom")

NAMESPACE = "default"


class Settings(BaseSettings):
    """Everything a fedloom process needs to know about its environment."""

    model_config = SettingsConfigDict(env_prefix="FEDLOOM_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = ""
    blob_url: str = ""
    s3_endpoint_url: str | None = None
    temporal_address: str | None = None
    temporal_namespace: str = NAMESPACE
    admin_api_key: str | None = None
    # How long the workflow waits for enough registered clients before a round fails.
    selection_timeout_s: float = Field(default=120.0, gt=0)
    # How long a round waits for uploads before closing with what it has.
    round_timeout_s: float = Field(default=300.0, gt=0)
    # Largest accepted upload.
    max_upload_mb: float = Field(default=512.0, gt=0)

    @field_validator("temporal_address")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'fedloom.db'}"
        if not self.blob_url:
            self.blob_url = f"file://{self.data_dir / 'blobs'}"
        if not (self.blob_url.startswith("file://") or self.blob_url.startswith("s3://")):
            raise ValueError(f"FEDLOOM_BLOB_URL must start with file:// or s3://, got {self.blob_url!r}")
        if not (self.database_url.startswith("sqlite") or self.database_url.startswith("postgresql")):
            raise ValueError(
                f"FEDLOOM_DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL, got {self.database_url!r}"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
