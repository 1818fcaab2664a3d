"""corrections: masks saved as ground truth

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "corrections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_key", sa.String(length=64), nullable=False),
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("frame", sa.Integer(), nullable=False),
        sa.Column("lesion_px", sa.Integer(), nullable=False),
        sa.Column("mask_source", sa.String(length=16), nullable=False),
        sa.Column("model_version", sa.String(length=255), nullable=True),
        sa.Column("prompts", sa.JSON(), nullable=False),
        sa.Column("sop_instance_uid_sha256", sa.String(length=64), nullable=True),
        sa.Column("deidentified", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
        sa.UniqueConstraint("image_key", name=op.f("uq_corrections_image_key")),
    )


def downgrade() -> None:
    op.drop_table("corrections")
