"""The same migrations and flows on PostgreSQL (the database for several machines)."""
from __future__ import annotations

import io

import pytest
from sqlalchemy import select

from tests.appfixtures import add_user, image_bytes, login, postgres_available, scratch_postgres_database

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL on 127.0.0.1:5432 (user postgres)")]


@pytest.fixture
def pg_app(make_app):
    with scratch_postgres_database("breast_review_test") as url:
        app = make_app(SQLALCHEMY_DATABASE_URI=url, SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True})
        try:
            yield app
        finally:
            with app.app_context():
                from webapp.extensions import db

                db.engine.dispose()


def test_migrations_upload_list_and_one_active_model_on_postgresql(pg_app):
    import flask_migrate
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.exc import IntegrityError

    from webapp import MIGRATIONS_DIR
    from webapp.extensions import db
    from webapp.models import Case, ModelVersion

    app = pg_app
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        with db.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), db.metadata) == []
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    response = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes(seed=s)), f"{s}.png") for s in (1, 2)]})
    assert response.status_code == 303
    html = client.get("/cases?status=queued").data
    assert b"1.png" in html and b"2.png" in html
    with app.app_context():
        assert db.session.scalars(select(Case.status)).all() == ["queued", "queued"]
        for i in (1, 2):
            db.session.add(ModelVersion(name=f"v{i}", file_key="models/00/" + "0" * 64 + ".pt",
                                        checksum=str(i) * 64, threshold=0.5, is_active=True))
        with pytest.raises(IntegrityError):  # the database refuses two active versions
            db.session.commit()
