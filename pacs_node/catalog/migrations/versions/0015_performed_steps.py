"""performed procedure steps: what each MPPS a scanner sent says (status, listed instances)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "performed_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "IN PROGRESS",
                "COMPLETED",
                "DISCONTINUED",
                name="performedstepstatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("listed", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_performed_steps")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_performed_steps_sop_instance_uid")),
    )
    op.create_index(op.f("ix_performed_steps_study_uid"), "performed_steps", ["study_uid"])
    op.create_index("ix_performed_steps_ae_status", "performed_steps", ["calling_ae", "status"])
    op.create_table(
        "performed_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["step_id"],
            ["performed_steps.id"],
            name=op.f("fk_performed_instances_step_id_performed_steps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_performed_instances")),
        sa.UniqueConstraint(
            "step_id", "sop_instance_uid", name=op.f("uq_performed_instances_step_id")
        ),
    )
    op.create_index(op.f("ix_performed_instances_step_id"), "performed_instances", ["step_id"])
    op.create_index(
        op.f("ix_performed_instances_sop_instance_uid"), "performed_instances", ["sop_instance_uid"]
    )


def downgrade() -> None:
    op.drop_table("performed_instances")
    op.drop_table("performed_steps")
