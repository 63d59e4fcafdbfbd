"""reviews, review revisions, blinded review setting

Revision ID: 7dacc5446677
Revises: 13b4ef443526
Create Date: 2026-11-25 20:48:01.017315

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '7dacc5446677'
down_revision = '13b4ef443526'
branch_labels = None
depends_on = None


def upgrade():
    # Reviews keep every submitted version in review_revision (append-only).
    op.create_table('review',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('reviewer_id', sa.Integer(), nullable=False),
    sa.Column('prediction_id', sa.Integer(), nullable=True),
    sa.Column('model_version_id', sa.Integer(), nullable=True),
    sa.Column('model_label', sa.String(length=16), nullable=True),
    sa.Column('model_probability', sa.Float(), nullable=True),
    sa.Column('verdict', sa.String(length=16), nullable=True),
    sa.Column('label', sa.String(length=16), nullable=True),
    sa.Column('detailed_label', sa.String(length=16), nullable=True),
    sa.Column('confidence', sa.String(length=16), nullable=True),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('reading_seconds', sa.Float(), nullable=True),
    sa.Column('blinded', sa.Boolean(), nullable=False),
    sa.Column('blinded_label', sa.String(length=16), nullable=True),
    sa.Column('blinded_confidence', sa.String(length=16), nullable=True),
    sa.Column('blinded_seconds', sa.Float(), nullable=True),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('submitted_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['case_id'], ['case.id'], name=op.f('fk_review_case_id_case'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_version.id'], name=op.f('fk_review_model_version_id_model_version')),
    sa.ForeignKeyConstraint(['prediction_id'], ['prediction.id'], name=op.f('fk_review_prediction_id_prediction'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['reviewer_id'], ['user.id'], name=op.f('fk_review_reviewer_id_user')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_review')),
    sa.UniqueConstraint('case_id', 'reviewer_id', name=op.f('uq_review_case_id_reviewer_id'))
    )
    with op.batch_alter_table('review', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_review_case_id'), ['case_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_review_reviewer_id'), ['reviewer_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_review_submitted_at'), ['submitted_at'], unique=False)

    op.create_table('review_revision',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('review_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('verdict', sa.String(length=16), nullable=True),
    sa.Column('label', sa.String(length=16), nullable=True),
    sa.Column('detailed_label', sa.String(length=16), nullable=True),
    sa.Column('confidence', sa.String(length=16), nullable=True),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('reading_seconds', sa.Float(), nullable=True),
    sa.Column('model_version_id', sa.Integer(), nullable=True),
    sa.Column('model_label', sa.String(length=16), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_version.id'], name=op.f('fk_review_revision_model_version_id_model_version')),
    sa.ForeignKeyConstraint(['review_id'], ['review.id'], name=op.f('fk_review_revision_review_id_review'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_review_revision')),
    sa.UniqueConstraint('review_id', 'revision', name=op.f('uq_review_revision_review_id_revision'))
    )
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('blinded_review', sa.Boolean(), server_default=sa.false(), nullable=False))

    # ### end Alembic commands ###


def downgrade():
    # Reviews keep every submitted version in review_revision (append-only).
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('blinded_review')

    op.drop_table('review_revision')
    with op.batch_alter_table('review', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_review_submitted_at'))
        batch_op.drop_index(batch_op.f('ix_review_reviewer_id'))
        batch_op.drop_index(batch_op.f('ix_review_case_id'))

    op.drop_table('review')
    # ### end Alembic commands ###
