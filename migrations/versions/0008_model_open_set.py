"""models.open_set: the open-set decision last fitted on the model's gallery, with its figures

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 18:00:00

- ``models.open_set``: ``service.models.openset.OpenSetFit.figures`` (what was fitted, the
  queries used, the expected MAP@5, the share of known queries answered ``new_individual``
  first), with when and on what occasion it was fitted. The fitted value itself is kept where
  the model's head and calibration live (``models.cutoff``, ``models.calibration``). None for
  every model before it: nothing was fitted on a gallery.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("open_set", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("open_set")
