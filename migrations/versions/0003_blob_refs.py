"""Blob references: who holds each blob (uploads, generation inputs and outputs), so deletion
and retention remove a content-addressed blob only when its last holder goes. Existing uploads
and works are recorded as holders.

Revision ID: 0003_blob_refs
Revises: 0002_max_priority
Create Date: 2026-11-30
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_blob_refs"
down_revision: str | None = "0002_max_priority"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    refs = op.create_table(
        "blob_refs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("blob_key", sa.String(80), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("owner_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_refs")),
        sa.UniqueConstraint("blob_key", "kind", "owner_id", name=op.f("uq_blob_refs_blob_owner")),
        sa.CheckConstraint("kind IN ('upload', 'input', 'output')", name=op.f("ck_blob_refs_ref_kind")),
    )
    op.create_index(op.f("ix_blob_refs_blob_key"), "blob_refs", ["blob_key"])
    op.create_index(op.f("ix_blob_refs_user_kind"), "blob_refs", ["user_id", "kind"])
    op.create_index(op.f("ix_blob_refs_kind_owner"), "blob_refs", ["kind", "owner_id"])
    op.create_index(op.f("ix_blob_refs_kind_created"), "blob_refs", ["kind", "created_at"])

    # Typed views of the old tables, so every backend hands back datetimes and JSON as such.
    files = sa.table("files", sa.column("id", sa.String), sa.column("user_id", sa.String),
                     sa.column("blob_key", sa.String), sa.column("origin", sa.String),
                     sa.column("created_at", sa.DateTime(timezone=True)))
    works = sa.table("works", sa.column("task_id", sa.String), sa.column("user_id", sa.String),
                     sa.column("images", sa.JSON), sa.column("created_at", sa.DateTime(timezone=True)))
    bind = op.get_bind()
    rows = [
        {"blob_key": r.blob_key, "user_id": r.user_id, "kind": "upload", "owner_id": r.id, "created_at": r.created_at}
        for r in bind.execute(sa.select(files).where(files.c.origin == "upload"))
    ]
    for r in bind.execute(sa.select(works)):
        images = r.images if isinstance(r.images, list) else json.loads(r.images or "[]")
        for key in dict.fromkeys(i["key"] for i in images):
            rows.append({"blob_key": key, "user_id": r.user_id, "kind": "output", "owner_id": r.task_id,
                         "created_at": r.created_at})
    if rows:
        op.bulk_insert(refs, rows)


def downgrade() -> None:
    op.drop_table("blob_refs")
