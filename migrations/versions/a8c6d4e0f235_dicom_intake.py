"""dicom intake: source format, de-identified metadata, burned-in annotation flag, patient key

Revision ID: a8c6d4e0f235
Revises: f7b5c3d9e124
Create Date: 2026-12-02 09:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = 'a8c6d4e0f235'
down_revision = 'f7b5c3d9e124'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('case', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_format', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('dicom_meta', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('burned_in_annotation', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('patient_key', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_case_patient_key'), ['patient_key'], unique=False)


def downgrade():
    with op.batch_alter_table('case', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_case_patient_key'))
        batch_op.drop_column('patient_key')
        batch_op.drop_column('burned_in_annotation')
        batch_op.drop_column('dicom_meta')
        batch_op.drop_column('source_format')
