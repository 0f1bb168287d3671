"""Service settings, read from ``WHALEID_*`` environment variables or a ``.env`` file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every value has a working embedded default: SQLite and files under ``./data``."""

    model_config = SettingsConfigDict(env_prefix="WHALEID_", env_file=".env", extra="ignore")

    data_dir: Path = Path("data")
    database_url: str = ""
    # Where model files and photos live: empty for the data directory, or s3://bucket/prefix for
    # an S3-compatible bucket that replicas on several machines share (the `s3` extra). Each
    # replica keeps the model files it uses in its data directory, fetched by hash and verified.
    storage_url: str = ""
    s3_endpoint_url: str = ""  # e.g. http://minio:9000; empty for AWS S3
    s3_region: str = "us-east-1"
    # Empty: boto3's own chain (AWS_* variables, ~/.aws, an instance role).
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    max_upload_bytes: int = 25 * 1024 * 1024
    # Every other request body (JSON, the sign-in form) is small.
    max_body_bytes: int = 1024 * 1024
    max_image_pixels: int = 60_000_000
    # Decodes and embeds run in a bounded number of slots each; a request that waits longer than
    # slot_wait_seconds for one gets 503 with Retry-After (docs/reliability.md: the memory bound).
    decode_slots: int = 2
    # 0: two inferences per core's worth of onnx_threads threads (4 on 2 cores with the default
    # onnx_threads): one inference leaves gaps in its parallel loops that the next fills. With
    # one slot, 4 and 16 clients got 0.66-0.71x the bare pipeline's throughput (its threads
    # run their inferences at once); with 4, 0.90-0.97x (docs/performance.md, "Throughput").
    embed_slots: int = Field(default=0, ge=0)
    slot_wait_seconds: float = 10.0
    # A query photo is stored as the region the model saw, its longer side at most this.
    stored_photo_max_side: int = 1024
    # Local features (service/matching/features.py): RootSIFT at most this many keypoints per
    # photo, extracted with the photo's longer side scaled to at most features_max_side pixels.
    # Changing either names a new extractor: its features are extracted afresh.
    features_max_side: int = Field(default=640, ge=64, le=4096)
    features_count: int = Field(default=400, ge=16, le=2000)
    # Verification (a model set to `rerank`, and the local-features matcher): the first
    # rerank_individuals candidates are verified, each on its rerank_photos nearest photos.
    rerank_individuals: int = Field(default=10, ge=1, le=50)
    rerank_photos: int = Field(default=3, ge=1, le=20)
    # The local-features matcher's descriptor index is exact up to this many descriptors, then
    # IVF with 8-bit scalar quantisation (about 136 bytes a descriptor).
    local_ivf_threshold: int = Field(default=20_000, ge=1000)
    # From this many gallery photos the descriptor index is compressed (IVF with 6-bit scalar
    # quantisation, 104 bytes a descriptor with its id), built in the background from the stored
    # features while the index in use keeps answering (service/matching/local.py).
    local_compressed_photos: int = Field(default=20_000, ge=100)
    # `whaleid prune` removes query photos never confirmed after this many days.
    query_photo_retention_days: int = 90
    # The review page's cookies are Secure: "auto" when the request came over HTTPS (directly or
    # through a proxy that says X-Forwarded-Proto: https), "always" or "never".
    secure_cookie: Literal["auto", "always", "never"] = "auto"
    # A review page sign-in lasts this long (then the curator signs in again); logging out or
    # revoking the key ends it sooner. The cookie holds only a random session id.
    review_session_hours: float = Field(default=12.0, gt=0)
    # Signs the review page's sign-in and logout form tokens, so that a token planted from
    # another site (a sibling subdomain can set cookies) is refused. Empty: a secret generated
    # once into the object store (secrets/form-secret: the data directory, or the shared bucket).
    form_secret: SecretStr = SecretStr("")
    onnx_threads: int = 0
    # Threads of numpy's BLAS (verification's matrix products: service/matching/verify.py) in a
    # serving process; 0 leaves the library's default (every core). One: a product of a query's
    # descriptors against a shortlist's is too small to gain from more, and waking a pool for it
    # cost 2-40x its time on a busy 2-core machine (docs/performance.md, "Local features").
    blas_threads: int = Field(default=1, ge=0, le=256)
    # Whether onnxruntime's idle threads spin, waiting for the next inference, in /identify.
    # Background jobs never spin (their decoding threads need the cores).
    onnx_spinning: bool = True
    embed_batch_size: int = 16
    ivf_threshold: int = 200_000
    # The gallery's vectors as half floats (faiss QT_fp16): half the memory, an exact scan of
    # 50k 512-d photos in 2.3 ms instead of 6, recall@50 0.9997 against float32, the same
    # MAP@5 on every set (docs/performance.md); distances move by about 1e-4 to 1e-3.
    gallery_float16: bool = True
    log_level: str = "INFO"
    # "json": one JSON object a line, with the request id (service/logs.py).
    log_format: Literal["text", "json"] = "text"
    # Per API key and per process (limits notation, e.g. "600/minute"; empty: no limit). With N
    # replicas behind a balancer a key may make up to N times as many requests.
    rate_limit: str = ""
    # A request still unanswered after this long gets 504 (0: no limit).
    request_timeout_seconds: float = 120.0
    # Origins allowed to call the API from a browser, comma-separated ("*": any); empty: no CORS.
    cors_origins: str = ""
    # /metrics needs an API key of any role unless this opens it (a scraper on a private network).
    metrics_public: bool = False
    # Photos one encounter may send to /encounters/identify.
    encounter_max_photos: int = 5
    # API keys are required unless this is switched off explicitly (a local demo).
    auth: bool = True
    # /identify admits a key it has seen valid within this many seconds without looking it up
    # before reading the upload; the active model's check, beside the decoding, then confirms
    # it in the same statement, so a revoked key is refused (401) before anything is stored.
    # 0: every request looks its key up first.
    key_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    # Background jobs: a worker runs inside the API process unless switched off (then run
    # `whaleid worker` elsewhere). A chunk's lease lapses unless renewed within this time.
    worker: bool = True
    job_lease_seconds: float = 30.0
    job_poll_seconds: float = 1.0
    # Each chunk costs about 30 ms of its own (lease, look-ups, the pipeline filling and
    # draining, the commit): at 256 a small fast model re-indexed at 0.84x its bare pipeline, at
    # 512 0.91x (docs/performance.md, "Re-index throughput"); a crash redoes one chunk.
    reindex_chunk_size: int = 512
    max_model_bytes: int = 1024 * 1024 * 1024
    # Fewer curator-confirmed identifications than this cannot judge a new model.
    shadow_min_confirmations: int = 20
    # A model that verifies (or the local-features matcher) is scored through /identify's own
    # path on at most this many confirmations (about 0.1 s each), with and without verification.
    shadow_verify_queries: int = Field(default=200, ge=0, le=100_000)
    # The share of new animals a catalogue expects among its queries, for the open-set decision
    # fitted on its gallery (``models.openset``) until the curators have decided enough
    # identifications to say (a fifth: docs/operations.md, "The open-set decision").
    open_set_p_new: float = Field(default=0.2, ge=0.0, le=1.0)
    # Sampled gallery photos the open-set fit asks (each twice), and of one individual at most.
    open_set_queries: int = Field(default=400, ge=1, le=100_000)
    open_set_per_individual: int = Field(default=3, ge=1, le=1000)
    # Batch identification (POST /jobs/identify, docs/integration.md).
    batch_max_items: int = 1000
    batch_chunk_size: int = 16
    batch_max_archive_bytes: int = 200 * 1024 * 1024
    batch_max_uncompressed_bytes: int = 1024 * 1024 * 1024
    # What one API key may have at once, so that one partner cannot starve the others: jobs
    # queued or running, photos waiting in them, and bytes of archive photos held in the store.
    key_max_live_jobs: int = 10
    key_max_waiting_photos: int = 5000
    key_max_held_bytes: int = 2 * 1024 * 1024 * 1024
    # `whaleid prune` removes archive photos no open job holds once they are this old.
    batch_orphan_grace_hours: float = 1.0
    # Photo URLs are fetched only from these host names (exact, case-insensitive), and never
    # from a private, loopback, link-local or otherwise non-public address they resolve to.
    fetch_hosts: list[str] = []
    fetch_timeout_seconds: float = 10.0
    # Callbacks go only to the host names an admin allowed for the job's key, under the same
    # address rule, signed with that key's own secret (`whaleid keys callbacks`, or
    # POST /keys/{id}/callback-secret and PUT /keys/{id}/callback-hosts).
    callback_attempts: int = 5
    callback_backoff_seconds: float = 1.0
    callback_timeout_seconds: float = 10.0
    # TESTS ONLY: lets photo fetches and callbacks reach 127.0.0.1/::1 (still only hosts on the
    # allowlists). Never switch this on in a deployment.
    unsafe_allow_loopback_for_tests: bool = False
    # Fault injection for tests: "after-decision-commit" kills the process between a decision's
    # database commit and the gallery update.
    failpoint: str = ""

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str) -> str:
        # Heroku-style URLs say postgres://; SQLAlchemy wants a driver named.
        if value.startswith("postgres://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgres://")
        elif value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'whaleid.sqlite3').resolve()}"

    @property
    def embed_slot_count(self) -> int:
        """``embed_slots``, or its default: two inferences for each ``onnx_threads`` threads the
        cores hold (every core, when onnxruntime decides), at least two."""
        if self.embed_slots:
            return self.embed_slots
        cores = os.cpu_count() or 1
        return max(2, 2 * cores // self.onnx_threads if self.onnx_threads else 2 * cores)

    @property
    def photos_dir(self) -> Path:
        return self.data_dir / "photos"

    @property
    def indexes_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def ensure_dirs(self) -> None:
        """Create the data directory tree."""
        for path in (self.data_dir, self.photos_dir, self.indexes_dir, self.models_dir):
            path.mkdir(parents=True, exist_ok=True)
