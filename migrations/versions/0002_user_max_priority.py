"""Users get `max_priority`: the highest lane (high, normal, low) their generations may ask
for when waiting for a model's quota. Existing users get `normal`.

Revision ID: 0002_max_priority
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_max_priority"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("max_priority", sa.String(8), server_default="normal", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("max_priority")
