"""The database schema (SQLAlchemy 2) and session helpers. The database is the source of truth."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from service.contract import ModelStatus
from service.db.checks import refuse_bad_text

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def table_of(entity: type[Base]) -> Table:
    """The entity's table, for Core statements: a list of rows inserted into it goes to the
    driver in one batch, without the ORM's per-row bookkeeping (measured: most of a bulk
    insert's time through the class)."""
    return cast(Table, entity.__table__)


def insert_unless_there(entity: type[Base], unique: Sequence[str]) -> dict[str, Any]:
    """By dialect name, an ``INSERT`` into the entity's table that skips a row whose ``unique``
    columns are already there (``ON CONFLICT DO NOTHING``, PostgreSQL and SQLite alike)."""
    return {
        dialect: make(table_of(entity)).on_conflict_do_nothing(index_elements=list(unique))
        for dialect, make in (("postgresql", postgresql_insert), ("sqlite", sqlite_insert))
    }


class Individual(Base):
    """An animal of the catalogue, known by the catalogue's own id (Happywhale's individual_id)."""

    __tablename__ = "individuals"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    catalogue_id: Mapped[str] = mapped_column(String(200), unique=True)
    species: Mapped[str | None] = mapped_column(String(100), index=True)
    display_name: Mapped[str | None] = mapped_column(String(200))
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("individuals.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="individual")


class Image(Base):
    """A stored photo, content-addressed: identical uploads share one row and one file."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    file_path: Mapped[str] = mapped_column(String(300))
    media_type: Mapped[str] = mapped_column(String(50))
    byte_size: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    original_name: Mapped[str | None] = mapped_column(String(500))
    species: Mapped[str | None] = mapped_column(String(100), index=True)
    encounter: Mapped[str | None] = mapped_column(String(200), index=True)
    location: Mapped[str | None] = mapped_column(String(200), index=True)
    taken_on: Mapped[dt.date | None] = mapped_column(Date)
    individual_id: Mapped[int | None] = mapped_column(ForeignKey("individuals.id"), index=True)
    source: Mapped[str] = mapped_column(String(20), default="catalogue")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A query photo never confirmed is pruned after the retention period (`whaleid prune`): its
    # file and embeddings go, the row stays for the identifications that answered it.
    pruned_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    individual: Mapped[Individual | None] = relationship(back_populates="images")


class Model(Base):
    """A registered ONNX embedding model with its preprocessing and kNN-head settings."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(100))
    file_hash: Mapped[str] = mapped_column(String(64), unique=True)
    file_path: Mapped[str] = mapped_column(String(300))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    preprocessing: Mapped[dict[str, Any]] = mapped_column(JSON)
    k: Mapped[int] = mapped_column(Integer)
    cutoff: Mapped[float] = mapped_column(Float)
    ranking: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=ModelStatus.REGISTERED, index=True)
    metadata_props: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A name of matching.registry's kinds (contract.ModelKind: the built-in ones).
    kind: Mapped[str] = mapped_column(String(20), default="onnx", server_default="onnx")
    # A name of matching.registry's verification modes (contract.Verification: the built-in
    # ones): the matchers added to the kind's, such as local features.
    verification: Mapped[str] = mapped_column(String(20), default="none", server_default="none")
    # contract.Calibration.as_dict(): the fitted calibration of the evidence (None: the defaults).
    calibration: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # models.openset.OpenSetFit.figures (and when and why it ran): the open-set decision last
    # fitted on the gallery; its value is kept in ``cutoff`` or ``calibration``'s threshold.
    open_set: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Feature(Base):
    """The local features of one photo by one extractor (``matching.features``): keypoints in
    the stored photo's pixels (float32 x, y) and descriptors (uint8 rows), shared by every
    model. Keyed by the extractor's name, which names its settings, so new settings mean new
    rows, never a silent mix."""

    __tablename__ = "features"
    __table_args__ = (
        UniqueConstraint("image_id", "extractor", name="uq_features_image_extractor"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    extractor: Mapped[str] = mapped_column(String(100))
    count: Mapped[int] = mapped_column(Integer)
    keypoints: Mapped[bytes] = mapped_column(LargeBinary)
    descriptors: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """One image embedded by one model: an L2-normalised float32 vector. Its id is the faiss id."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("image_id", "model_id", name="uq_embeddings_image_model"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Identification(Base):
    """One answer of ``POST /identify``: what was asked, what was used, what was proposed."""

    __tablename__ = "identifications"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    query_image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    filters: Mapped[dict[str, Any]] = mapped_column(JSON)
    bbox: Mapped[list[int] | None] = mapped_column(JSON)
    k: Mapped[int] = mapped_column(Integer)
    cutoff: Mapped[float] = mapped_column(Float)
    ranking: Mapped[str] = mapped_column(String(20))
    # The verification mode it was answered with (a name of matching.registry's modes), and
    # the version of the calibration that scored it (contract.Calibration.version; None: the
    # kNN head alone, or an answer recorded before versions were).
    verification: Mapped[str] = mapped_column(String(20), default="none", server_default="none")
    calibration_version: Mapped[str | None] = mapped_column(String(64))
    gallery_size: Mapped[int] = mapped_column(Integer)
    # The API key that asked (None: the command line, or auth off): an integration key reads
    # only its own identifications and query photos (service.access.tenancy).
    key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(
        String(20), default="pending", index=True
    )  # curation.IdentificationStatus
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )

    candidates: Mapped[list[Candidate]] = relationship(
        back_populates="identification", order_by="Candidate.rank", cascade="all, delete-orphan"
    )
    query_image: Mapped[Image] = relationship()
    model: Mapped[Model] = relationship()


class Candidate(Base):
    """One ranked line of an identification; ``label`` is a catalogue id or ``new_individual``."""

    __tablename__ = "identification_candidates"
    __table_args__ = (
        UniqueConstraint("identification_id", "rank", name="uq_candidates_identification_rank"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    identification_id: Mapped[int] = mapped_column(
        ForeignKey("identifications.id", ondelete="CASCADE")
    )
    rank: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(200))
    individual_id: Mapped[int | None] = mapped_column(ForeignKey("individuals.id"))
    species: Mapped[str | None] = mapped_column(String(100))
    votes: Mapped[int | None] = mapped_column(Integer)
    distance: Mapped[float | None] = mapped_column(Float)
    best_image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"))
    # Verification's evidence (None when the model does not verify): the most RANSAC inliers
    # of the candidate's photos with the query, and the fused match probability.
    inliers: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)

    identification: Mapped[Identification] = relationship(back_populates="candidates")


class GalleryChange(Base):
    """The log of gallery changes: a photo of this model's gallery was added, relabelled or
    removed. Every replica replays it to keep its in-memory index in step."""

    __tablename__ = "gallery_changes"
    # Ids never come back after a delete (SQLite would reuse the highest one otherwise), so a
    # replica's "replayed up to id N" stays true.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Decision(Base):
    """A curator's decision on an identification. A superseded decision stays in the history."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    identification_id: Mapped[int] = mapped_column(
        ForeignKey("identifications.id", ondelete="CASCADE"), index=True
    )
    decision: Mapped[str] = mapped_column(String(20))
    individual_id: Mapped[int | None] = mapped_column(ForeignKey("individuals.id"))
    candidate_rank: Mapped[int | None] = mapped_column(Integer)
    curator: Mapped[str] = mapped_column(String(200))
    comment: Mapped[str | None] = mapped_column(Text)
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    individual: Mapped[Individual | None] = relationship()


class IndividualEvent(Base):
    """The audit trail of an individual: created, renamed, merged, split, photos added."""

    __tablename__ = "individual_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    individual_id: Mapped[int] = mapped_column(ForeignKey("individuals.id"), index=True)
    event: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key, stored as a SHA-256 hash (keys are 256-bit random, so no slow hash needed)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The key's own callback trust: its jobs' callbacks are signed with this secret (the server
    # must sign with it, so it is kept, not hashed; shown once when made or rotated) and go only
    # to these host names.
    callback_secret: Mapped[str | None] = mapped_column(String(100))
    callback_hosts: Mapped[list[str] | None] = mapped_column(JSON)


class ReviewSession(Base):
    """A signed-in review page: the cookie holds a random id, stored here hashed; it ends at
    ``expires_at`` or when revoked (logout, or the key revoked)."""

    __tablename__ = "review_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """A background job (a re-index, later batch identification), split into leased chunks so
    that any number of workers share it and a dead worker's chunk is taken over."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(30))
    state: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[str]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(200))
    # The API key that made the job (None: the command line); only it, and admins, see the job.
    key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), index=True
    )
    # Bytes the job holds in the object store (an archive's photos) until it ends.
    held_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # When an ended job's files were removed and its end was reported (callback): nothing of it
    # is left to do.
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class JobChunk(Base):
    """A piece of a job's work. Phase 0 chunks run in any order; the phase 1 chunk (finishing the
    job) is leased only once every phase 0 chunk is done."""

    __tablename__ = "job_chunks"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_chunks_job_seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    phase: Mapped[int] = mapped_column(Integer, default=0)
    items: Mapped[list[int]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # When the chunk was last claimed: the worker serves the key served longest ago first.
    leased_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class ModelSwitch(Base):
    """One change of the active model (activation or rollback): the audit trail, and what a
    rollback goes back to."""

    __tablename__ = "model_switches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    from_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    to_model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(20))
    head: Mapped[dict[str, Any]] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(200))
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
            # Transactions are begun below, as IMMEDIATE: two writers then queue on the busy
            # timeout instead of one failing when it upgrades a read lock.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that refuse text either database would refuse or keep wrongly
    (service.db.checks)."""
    factory = sessionmaker(engine, expire_on_commit=False)
    event.listen(factory, "before_flush", refuse_bad_text)
    return factory


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with factory() as session, session.begin():
        yield session
