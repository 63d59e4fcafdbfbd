"""reader studies: studies, their readers, cases and ratings

Revision ID: 0c3e22f7a503
Revises: 0b2d11e6f402
Create Date: 2026-12-03 21:15:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0c3e22f7a503'
down_revision = '0b2d11e6f402'
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
