"""several partners on one service: jobs owned by their key, per-key callback trust, review
sessions, fair leasing, change ids that are never reused

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 12:40:00

- ``jobs.key_id``: the API key that made the job (another integration key gets 404);
  ``identifications.key_id``: the key that asked (an integration key reads only its own
  identifications, and only the query photos it sent);
  ``jobs.held_bytes``: what the job holds in the object store, for the per-key quota;
  ``jobs.closed_at``: the ended job's files are removed and its end reported.
- ``job_chunks.leased_at``: when a chunk was claimed, so the worker serves keys in turn.
- ``api_keys.callback_secret`` and ``api_keys.callback_hosts``: each key signs and sends its own
  callbacks.
- ``review_sessions``: the review page's cookie names a session, never the key.
- ``gallery_changes`` on SQLite becomes AUTOINCREMENT, so a deleted change id is never reused.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_id", _ID, nullable=True))
        batch_op.add_column(
            sa.Column("held_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_key_id"), ["key_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_key_id_api_keys"),
            "api_keys",
            ["key_id"],
            ["id"],
            ondelete="SET NULL",
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("held_bytes", server_default=None)
    # Jobs that ended before this migration have nothing left to do.
    op.execute(
        "UPDATE jobs SET closed_at = finished_at "
        "WHERE state IN ('succeeded', 'failed', 'cancelled')"
    )

    with op.batch_alter_table("job_chunks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("leased_at", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("identifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_id", _ID, nullable=True))
        batch_op.create_index(batch_op.f("ix_identifications_key_id"), ["key_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_identifications_key_id_api_keys"),
            "api_keys",
            ["key_id"],
            ["id"],
            ondelete="SET NULL",
        )

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("callback_secret", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("callback_hosts", sa.JSON(), nullable=True))

    op.create_table(
        "review_sessions",
        sa.Column("id", _ID, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", _ID, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
            name=op.f("fk_review_sessions_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_review_sessions_token_hash")),
    )
    with op.batch_alter_table("review_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_review_sessions_key_id"), ["key_id"], unique=False)

    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            "gallery_changes", recreate="always", table_kwargs={"sqlite_autoincrement": True}
        ):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            "gallery_changes", recreate="always", table_kwargs={"sqlite_autoincrement": False}
        ):
            pass
    with op.batch_alter_table("review_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_review_sessions_key_id"))
    op.drop_table("review_sessions")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("callback_hosts")
        batch_op.drop_column("callback_secret")
    with op.batch_alter_table("job_chunks", schema=None) as batch_op:
        batch_op.drop_column("leased_at")
    with op.batch_alter_table("identifications", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_identifications_key_id_api_keys"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_identifications_key_id"))
        batch_op.drop_column("key_id")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_key_id_api_keys"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_key_id"))
        batch_op.drop_column("closed_at")
        batch_op.drop_column("held_bytes")
        batch_op.drop_column("key_id")
