"""prediction: the most likely class and every class's probability (three-class models)

Revision ID: a3c1f0e2b801
Revises: 7dacc5446677
Create Date: 2026-11-26 04:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = 'a3c1f0e2b801'
down_revision = '7dacc5446677'
branch_labels = None
depends_on = None


def upgrade():
    # Nullable: predictions of two-class models, and every row made before, have neither.
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.add_column(sa.Column('predicted_class', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('class_probabilities', sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.drop_column('class_probabilities')
        batch_op.drop_column('predicted_class')
