"""case outbox (dispatched_at), session version per user, heartbeat table for /healthz

Revision ID: c4e2d9a7b310
Revises: a3c1f0e2b801
Create Date: 2026-11-26 05:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = 'c4e2d9a7b310'
down_revision = 'a3c1f0e2b801'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('case', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dispatched_at', sa.DateTime(), nullable=True))
    # Cases queued before this revision were sent when they were created.
    op.execute('UPDATE "case" SET dispatched_at = created_at WHERE status IN (\'queued\', \'running\')')
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('session_version', sa.Integer(), server_default=sa.text('0'),
                                      nullable=False))
    op.create_table(
        'heartbeat',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('beat_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_heartbeat')),
    )


def downgrade():
    op.drop_table('heartbeat')
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('session_version')
    with op.batch_alter_table('case', schema=None) as batch_op:
        batch_op.drop_column('dispatched_at')
