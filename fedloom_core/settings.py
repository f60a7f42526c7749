"""Process settings, read from ``FEDLOOM_*`` environment variables and validated at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("./.fedloom")

NAMESPACE = "default"


class Settings(BaseSettings):
    """Everything a fedloom process needs to know about its environment."""

    model_config = SettingsConfigDict(env_prefix="FEDLOOM_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    # Where the user's dataset files are read from (MNIST IDX files in <dir>/mnist, CIFAR-10 python batches
    # in <dir>/cifar10/cifar-10-batches-py); unset means ./datasets in the working directory. Never downloaded.
    datasets_dir: Path | None = None
    database_url: str = ""
    blob_url: str = ""
    s3_endpoint_url: str | None = None
    temporal_address: str | None = None
    temporal_namespace: str = NAMESPACE
    # Where operators open the Temporal Web UI; API answers link experiments there.
    temporal_ui_url: str = "http://127.0.0.1:8233"
    # HTTPS for the API (uvicorn's certificate settings): a PEM certificate (chain) and its key, both or neither.
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    # Addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto headers the API trusts.
    forwarded_allow_ips: str = "127.0.0.1"
    admin_api_key: str | None = None
    # How long the workflow waits for enough registered clients before a round fails.
    selection_timeout_s: float = Field(default=120.0, gt=0)
    # How long a round waits for uploads before closing with what it has.
    round_timeout_s: float = Field(default=300.0, gt=0)
    # An experiment's workflow continues as new after this many rounds (and whenever Temporal suggests it).
    continue_as_new_every: int = Field(default=200, ge=1)
    # How many experiments may run at once; past it POST /training/start answers 409 TRAINING_ALREADY_RUNNING.
    max_running_experiments: int = Field(default=1, ge=1)
    # Largest accepted upload (a model update or initial model file, in MB of 10^6 bytes).
    max_upload_mb: float = Field(default=512.0, gt=0)
    # Resumable uploads: the largest chunk one PUT may carry, and how long an untouched session lives.
    upload_chunk_mb: float = Field(default=64.0, gt=0)
    upload_session_ttl_s: float = Field(default=86400.0, gt=0)
    # Largest JSON request body (policy rules are the largest legitimate ones).
    max_json_kb: int = Field(default=4096, ge=1)
    # An upload whose body sends nothing for this long is dropped (408) and its spool file removed.
    upload_read_timeout_s: float = Field(default=30.0, gt=0)
    # After that grace, an upload must keep up this average rate (kB/s; 0 turns the floor off).
    upload_min_rate_kbps: float = Field(default=16.0, ge=0)
    # Self-registration: clients presenting this token may register themselves (off when unset).
    enrollment_token: str | None = None
    # Origins (comma-separated, e.g. "https://ops.example.com") whose pages may call the API; none by default.
    cors_origins: str = ""
    # Rate limits per key, fixed windows: (requests, window seconds). "memory" or "database".
    rate_limit_backend: str = Field(default="memory", pattern="^(memory|database)$")
    rate_limit_general: int = Field(default=100, ge=1)
    rate_limit_general_window_s: float = Field(default=60.0, gt=0)
    rate_limit_uploads: int = Field(default=10, ge=1)
    rate_limit_uploads_window_s: float = Field(default=60.0, gt=0)
    rate_limit_training_start: int = Field(default=5, ge=1)
    rate_limit_training_start_window_s: float = Field(default=3600.0, gt=0)
    rate_limit_websockets: int = Field(default=1, ge=1)
    # Experiment tracking, off the rounds' path (fedloom_core/tracking): an MLflow tracking URI and a
    # TensorBoard log dir; the worker exports each experiment's rounds there when set.
    mlflow_tracking_uri: str | None = None
    tensorboard_dir: Path | None = None
    tracking_poll_s: float = Field(default=5.0, gt=0)
    # host:port where a worker serves its own Prometheus metrics (unauthenticated: an internal network only).
    worker_metrics_address: str | None = None
    # Per client address: requests answered 401 (no key, a bad or unknown key) per window; past it the
    # address is refused 429 before any key lookup, except for keys this process has verified.
    rate_limit_auth_failures: int = Field(default=20, ge=1)
    rate_limit_auth_failures_window_s: float = Field(default=60.0, gt=0)
    # Storage retention (fedloom_core/storage/retention.py; an experiment's "retention" config overrides
    # these). Off keeps every round's updates and global model, as before retention existed.
    retention: bool = True
    # Keep a round's client updates after its model and metrics are committed.
    keep_updates: bool = False
    # Global models kept: the last N committed rounds, every k-th round (0: none), the initial and final ones.
    keep_last_models: int = Field(default=3, ge=1)
    keep_model_every: int = Field(default=10, ge=0)
    # Blobs no database row refers to are collected once older than this; the worker sweeps this often.
    orphan_grace_s: float = Field(default=3600.0, ge=0)
    retention_sweep_s: float = Field(default=30.0, gt=0)

    @field_validator(
        "temporal_address", "enrollment_token", "admin_api_key", "mlflow_tracking_uri", "worker_metrics_address"
    )
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
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ValueError("FEDLOOM_TLS_CERTFILE and FEDLOOM_TLS_KEYFILE must be set together")
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        """``cors_origins`` split at commas, without blanks and trailing slashes."""
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
