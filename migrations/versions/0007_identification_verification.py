"""identifications: the verification mode and the calibration version each was answered with

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 17:00:00

- ``identifications.verification``: the verification mode (a name of
  ``service.matching.registry``'s modes) the answer came from. Rows recorded before it are
  backfilled as ``GET /identifications/{id}`` used to tell them: ``rerank`` where a candidate
  carries inliers, else ``none``.
- ``identifications.calibration_version``: the version of the calibration that scored the
  answer (``contract.Calibration.version``); None for the kNN head alone, and for rows recorded
  before it (the calibration they were scored with was not kept).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("identifications", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("verification", sa.String(length=20), nullable=False, server_default="none")
        )
        batch_op.add_column(sa.Column("calibration_version", sa.String(length=64), nullable=True))
    op.execute(
        "UPDATE identifications SET verification = 'rerank' WHERE EXISTS ("
        "SELECT 1 FROM identification_candidates AS c "
        "WHERE c.identification_id = identifications.id AND c.inliers IS NOT NULL)"
    )


def downgrade() -> None:
    with op.batch_alter_table("identifications", schema=None) as batch_op:
        batch_op.drop_column("calibration_version")
        batch_op.drop_column("verification")
