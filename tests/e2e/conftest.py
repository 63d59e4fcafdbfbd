"""Fixtures for the browser tests: the real app (`manage.py run`: web + worker + embedded
broker) in a subprocess, and a headless Debian Chromium driven by Selenium.

Users on every served app (password ``quiet-harbour-lamp``): doc@example.org (clinician),
rev1@example.org and rev2@example.org (reviewers), admin@example.org (admin).

A failing browser test leaves a screenshot and the page source in ``test-artifacts/``
(or ``$TEST_ARTIFACTS``), named after the test.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.appfixtures import register_model
from webapp.config import PROJECT_ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PASSWORD = "quiet-harbour-lamp"
USERS = {"doc@example.org": "clinician", "rev1@example.org": "reviewer", "rev2@example.org": "reviewer",
         "admin@example.org": "admin"}
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or PROJECT_ROOT / "test-artifacts")

BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMEDRIVER) or shutil.which("chromedriver")),
                       reason="chromedriver is absent (apt-get install chromium chromium-driver)"),
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
                       reason="chromium is absent (apt-get install chromium chromium-driver)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """A running `manage.py run`: ``base`` URL, ``tmp_path``, ``instance`` folder, and
    ``app`` (a Flask app on the same instance, for preparing data with app_context)."""

    def __init__(self, base: str, tmp_path: Path, instance: Path, app, process=None):
        self.base, self.tmp_path, self.instance, self.app = base, tmp_path, instance, app
        self.process = process  # the `manage.py run` process

    # Unpacking keeps `base, tmp_path = served_app` working.
    def __iter__(self):
        return iter((self.base, self.tmp_path))


@pytest.fixture(scope="session")
def stopping_apps():
    """Apps told to stop (SIGTERM) by their tests; each must exit 0 and withdraw its broker's
    address. Checked here, once, at the end of the browser tests: a stop takes seconds
    (the worker's pool joins, torch unloads), and the next test need not wait for it."""
    stopping: list[tuple[subprocess.Popen, Path, Path, object]] = []
    yield stopping
    failures = []
    for process, tmp_path, instance, log in stopping:
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = "still running 60 s after SIGTERM"
        finally:
            log.close()
        run_log = tmp_path / "run.log"
        if code != 0:
            failures.append(f"manage.py run in {tmp_path} stopped with {code}:\n{run_log.read_text()[-3000:]}")
        elif (instance / "broker" / "url").exists():
            failures.append(f"manage.py run in {tmp_path} left its broker's address behind")
    assert not failures, "\n\n".join(failures)


@pytest.fixture
def served_app(tmp_path, tiny_checkpoint, stopping_apps):
    """A prepared instance folder served by `python manage.py run` in a subprocess. At the
    end it is sent SIGTERM; ``stopping_apps`` checks that it stopped cleanly."""
    import flask_migrate

    from webapp import MIGRATIONS_DIR, create_app
    from webapp.accounts import create_user
    from webapp.extensions import db

    instance = tmp_path / "instance"
    app = create_app({"INSTANCE_PATH": str(instance), "CELERY_BROKER_URL": "memory://"})
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        for email, role in USERS.items():
            create_user(email, PASSWORD, role)
    register_model(app, tiny_checkpoint, name="tiny-demo")
    with app.app_context():
        db.engine.dispose()

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "STORAGE_DIR")}
    env.update(INSTANCE_PATH=str(instance), STATUS_POLL_MS="300", WORKER_TORCH_THREADS="1")
    log = open(tmp_path / "run.log", "w")
    process = subprocess.Popen([sys.executable, "manage.py", "run", "--port", str(port)], cwd=PROJECT_ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("manage.py run did not start:\n" + (tmp_path / "run.log").read_text())
            time.sleep(0.2)
    yield ServedApp(base, tmp_path, instance, app, process)
    process.send_signal(signal.SIGTERM)
    stopping_apps.append((process, tmp_path, instance, log))


@pytest.fixture
def make_browser(tmp_path, request):
    """``make_browser(width=1366, height=900)`` opens a headless Chromium at that window
    size; every one opened is closed at the end, after a screenshot if the test failed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def make(width: int = 1366, height: int = 900):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     f"--user-data-dir={tmp_path / f'chrome-profile-{len(drivers)}'}",
                     f"--window-size={width},{height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(
            service=Service(CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")),
            options=options)
        driver.implicitly_wait(0)
        drivers.append(driver)
        return driver

    yield make
    report = getattr(request.node, "rep_call", None)
    failed = report is not None and report.failed
    for i, driver in enumerate(drivers):
        try:
            if failed:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                stem = ARTIFACTS / f"{request.node.name}-{i}"
                driver.save_screenshot(str(stem.with_suffix(".png")))
                stem.with_suffix(".html").write_text(driver.page_source)
        finally:
            driver.quit()


@pytest.fixture
def browser(make_browser):
    return make_browser(1280, 1000)


def sign_in(driver, base: str, email: str, password: str = PASSWORD) -> None:
    """Sign in through the login form and wait until the app has answered."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/login")
    driver.find_element(By.NAME, "email").send_keys(email)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form.card button, form.card input[type=submit]").click()
    WebDriverWait(driver, 30).until(lambda d: "/login" not in d.current_url)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.rep_call = report
    return report
