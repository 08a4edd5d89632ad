"""jobs.dispatched_at: when the job's message was last handed to the broker (null: never, or the broker was down)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 05:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('dispatched_at')
