"""The embedded broker keeps accepted jobs across a restart, and publishes its address."""
from __future__ import annotations

from webapp.background import celery_settings
from webapp.broker import EmbeddedBroker, discover_embedded_url
from webapp.config import load_config


def test_jobs_survive_a_broker_restart_and_the_url_is_published(tmp_path):
    from celery import Celery

    cfg = load_config({"INSTANCE_PATH": str(tmp_path), "TASK_QUEUE": "durability"})
    broker = EmbeddedBroker(tmp_path)
    url = broker.start()
    assert discover_embedded_url(tmp_path) == url
    celery_app = Celery("t")
    celery_app.config_from_object(celery_settings(cfg, url))
    celery_app.send_task("worker.tasks.predict_case", args=[42])
    celery_app.close()
    broker.stop()
    assert discover_embedded_url(tmp_path) is None

    again = EmbeddedBroker(tmp_path)
    new_url = again.start()
    try:
        assert new_url == url  # a fixed socket per instance folder: a restarted broker is found again
        assert again.server.llen("durability") == 1
    finally:
        again.stop()
