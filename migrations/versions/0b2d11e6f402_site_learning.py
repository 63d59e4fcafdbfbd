"""site learning loop (placeholder; filled only if the loop needs schema)

Revision ID: 0b2d11e6f402
Revises: 0a1c00d5e301
Create Date: 2026-12-03 21:15:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0b2d11e6f402'
down_revision = '0a1c00d5e301'
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
