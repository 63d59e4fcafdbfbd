"""out-of-distribution score and conformal prediction set on each prediction

Revision ID: 0a1c00d5e301
Revises: a8c6d4e0f235
Create Date: 2026-12-03 21:15:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0a1c00d5e301'
down_revision = 'a8c6d4e0f235'
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
