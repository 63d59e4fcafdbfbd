"""`manage.py worker` and `manage.py models ...`: parse, then delegate.

torch is imported only inside the commands that need it, so `--help` stays quick.
"""
from __future__ import annotations

import os

import click


@click.command()
@click.option("--concurrency", "-c", type=int, default=None,
              help="Processes (default WORKER_CONCURRENCY, 1). One per GPU is usual.")
@click.option("--pool", type=click.Choice(["prefork", "threads", "solo"]), default="prefork", show_default=True)
@click.option("--loglevel", default="info", show_default=True)
@click.option("--broker-url", default=None, help="Overrides CELERY_BROKER_URL (used by 'manage.py run').")
def worker(concurrency: int | None, pool: str, loglevel: str, broker_url: str | None) -> None:
    """Start a Celery worker that predicts queued cases (the command for a GPU machine)."""
    from webapp.models import set_command_line_actor
    from worker.app import create_worker_app

    set_command_line_actor(None)  # events of the worker's tasks are the system's

    celery_app = create_worker_app({"CELERY_BROKER_URL": broker_url} if broker_url else None)
    flask_app = celery_app.flask_app
    if not flask_app.extensions["celery_broker_available"]:
        raise click.ClickException(
            f"no broker: CELERY_BROKER_URL is not set and no embedded broker runs for "
            f"{flask_app.instance_path}. Start 'python manage.py run' on this machine, or set "
            "CELERY_BROKER_URL=redis://HOST:6379/0 (the same value as the web server's).")
    concurrency = concurrency or flask_app.config["WORKER_CONCURRENCY"]
    if pool == "prefork":
        # Imported once here, before the pool forks: every pool process, replacements
        # included, inherits torch and torchvision instead of spending seconds importing
        # them again. (Imports only: no torch work runs in this process, so nothing
        # unsafe to fork is running.)
        import ml.explain  # noqa: F401
        import ml.inference  # noqa: F401
    celery_app.worker_main([
        "worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", f"--pool={pool}",
        f"--queues={flask_app.config['TASK_QUEUE']}", f"--hostname=predict-{os.getpid()}@%h",
        # Workers need not talk to each other; skipping this saves seconds at start-up.
        "--without-gossip", "--without-mingle",
    ])


@click.group()
def models() -> None:
    """The model registry: register checkpoints as model versions."""


@models.command("register")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Version name (default v1, v2, ...).")
@click.option("--activate/--no-activate", default=None,
              help="Make it the active model (default: only when no model is active yet).")
@click.option("--notes", help="Free text kept with the version.")
def models_register(path: str, name: str | None, activate: bool | None, notes: str | None) -> None:
    """Check a checkpoint with ml/ and register it as a new model version."""
    from ml import MLError
    from ml.inference import Predictor
    from webapp import create_app
    from webapp.registry import RegistryError, register_model_version
    from worker.prediction import active_version

    try:
        predictor = Predictor.from_checkpoint(path, device="cpu")  # proves it loads and fits
    except MLError as exc:
        raise click.ClickException(f"not registered: {exc}") from None
    app = create_app()
    with app.app_context():
        if activate is None:
            activate = active_version() is None
        try:
            version = register_model_version(path, predictor.meta, name=name, activate=activate, notes=notes)
        except RegistryError as exc:
            raise click.ClickException(f"not registered: {exc}") from None
        state = "active" if version.is_active else "not active"
        click.echo(f"registered {version.name} ({state}; threshold {version.threshold:.3f}, "
                   f"input {version.input_size} px, sha256 {version.checksum[:12]})")


@click.command()
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Checkpoint to register (default demo/model.pt).")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of PNG sample images (default demo/images).")
@click.option("--broker-url", default=None, help="Overrides CELERY_BROKER_URL (used by 'manage.py run --demo').")
def demo(model_path: str | None, images_dir: str | None, broker_url: str | None) -> None:
    """Register the bundled demo model and queue the sample images as cases (idempotent)."""
    from pathlib import Path

    from webapp import create_app
    from worker.demo import DEMO_IMAGES, DEMO_MODEL, seed_demo

    app = create_app({"CELERY_BROKER_URL": broker_url} if broker_url else None)
    with app.app_context():
        try:
            outcome = seed_demo(Path(model_path) if model_path else DEMO_MODEL,
                                Path(images_dir) if images_dir else DEMO_IMAGES)
        except Exception as exc:  # the demo is a convenience: say why, never crash the server
            raise click.ClickException(f"demo not loaded: {exc}") from None
    click.echo(f"demo model: {outcome.model}; sample cases added: {len(outcome.cases_added)}, "
               f"already present: {outcome.cases_present}")


COMMANDS = [worker, models, demo]
