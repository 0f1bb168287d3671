"""local features: the features table, a model's kind, verification and calibration, each
candidate's verification evidence

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 18:00:00

- ``features``: the RootSIFT keypoints and descriptors of a photo, per extractor.
- ``models.kind`` (``onnx`` or the built-in ``local-features``), ``models.verification``
  (``none`` or ``rerank``) and ``models.calibration`` (the fitted calibration, JSON).
- ``identification_candidates.inliers`` and ``.score``: the evidence each answer carried.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "features",
        sa.Column("id", _ID, nullable=False),
        sa.Column("image_id", _ID, nullable=False),
        sa.Column("extractor", sa.String(length=100), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("keypoints", sa.LargeBinary(), nullable=False),
        sa.Column("descriptors", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_features_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_features")),
        sa.UniqueConstraint("image_id", "extractor", name="uq_features_image_extractor"),
    )
    op.create_index(op.f("ix_features_image_id"), "features", ["image_id"], unique=False)
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=20), nullable=False, server_default="onnx")
        )
        batch_op.add_column(
            sa.Column("verification", sa.String(length=20), nullable=False, server_default="none")
        )
        batch_op.add_column(sa.Column("calibration", sa.JSON(), nullable=True))
    with op.batch_alter_table("identification_candidates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("inliers", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("identification_candidates", schema=None) as batch_op:
        batch_op.drop_column("score")
        batch_op.drop_column("inliers")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("calibration")
        batch_op.drop_column("verification")
        batch_op.drop_column("kind")
    op.drop_index(op.f("ix_features_image_id"), table_name="features")
    op.drop_table("features")
