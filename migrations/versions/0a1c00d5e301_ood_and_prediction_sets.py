"""out-of-distribution score and conformal prediction set on each prediction

Revision ID: 0a1c00d5e301
Revises: f7b5c3d9e124
Create Date: 2026-12-03 21:15:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0a1c00d5e301'
down_revision = 'f7b5c3d9e124'
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
