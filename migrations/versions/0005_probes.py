"""probes, and pool_versions.probe_scores: what a version learnt and kept, scored on a probe its job named

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10 10:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('probes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('raw_bytes', sa.Integer(), nullable=False),
    sa.Column('items', sa.Integer(), nullable=False),
    sa.Column('kinds', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.add_column('pool_versions', sa.Column('probe_scores', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('pool_versions') as batch:
        batch.drop_column('probe_scores')
    op.drop_table('probes')
