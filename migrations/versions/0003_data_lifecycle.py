"""data lifecycle: pinned and deleted versions, deleted corpora, expert usage roll-ups (totals and time buckets)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 05:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def _usage_rollup_columns() -> list:
    return [
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.Column('layer', sa.Integer(), nullable=False),
    ]


def upgrade() -> None:
    op.add_column('pool_versions', sa.Column('pinned', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column('pool_versions', sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('corpora', sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('expert_usage', sa.Column('folded', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index('ix_expert_usage_folded', 'expert_usage', ['folded', 'version_id', 'layer'], unique=False)
    op.create_table('expert_usage_totals',
    *_usage_rollup_columns(),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('windows', sa.Integer(), nullable=False),
    sa.Column('counts', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['pool_versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version_id', 'layer')
    )
    op.create_table('expert_usage_buckets',
    *_usage_rollup_columns(),
    sa.Column('bucket_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_window_end', sa.DateTime(timezone=True), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('windows', sa.Integer(), nullable=False),
    sa.Column('counts', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['pool_versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version_id', 'layer', 'bucket_start')
    )


def downgrade() -> None:
    op.drop_table('expert_usage_buckets')
    op.drop_table('expert_usage_totals')
    op.drop_index('ix_expert_usage_folded', table_name='expert_usage')
    with op.batch_alter_table('expert_usage') as batch:
        batch.drop_column('folded')
    with op.batch_alter_table('corpora') as batch:
        batch.drop_column('deleted_at')
    with op.batch_alter_table('pool_versions') as batch:
        batch.drop_column('deleted_at')
        batch.drop_column('pinned')
