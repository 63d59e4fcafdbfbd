"""case withdrawal: when and by whom a mistaken upload was taken back

Revision ID: f7b5c3d9e124
Revises: e6a4b2c8d013
Create Date: 2026-12-01 09:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = 'f7b5c3d9e124'
down_revision = 'e6a4b2c8d013'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('case', schema=None) as batch_op:
        batch_op.add_column(sa.Column('withdrawn_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('withdrawn_by_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_case_withdrawn_by_id_user'), 'user',
                                    ['withdrawn_by_id'], ['id'])


def downgrade():
    with op.batch_alter_table('case', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_case_withdrawn_by_id_user'), type_='foreignkey')
        batch_op.drop_column('withdrawn_by_id')
        batch_op.drop_column('withdrawn_at')
