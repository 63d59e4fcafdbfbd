"""The whole product as a user meets it: `manage.py run` (web + worker + embedded broker)
driven by a real Chromium: sign in, upload, watch the page update, read the result."""
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

from tests.appfixtures import image_bytes, register_model
from webapp.config import PROJECT_ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = [
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


@pytest.fixture
def served_app(tmp_path, tiny_checkpoint):
    """A prepared instance folder served by `python manage.py run` in a subprocess."""
    import flask_migrate

    from webapp import MIGRATIONS_DIR, create_app
    from webapp.accounts import create_user
    from webapp.extensions import db

    instance = tmp_path / "instance"
    app = create_app({"INSTANCE_PATH": str(instance), "CELERY_BROKER_URL": "memory://"})
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        create_user("doc@example.org", "password-123", "clinician")
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
    yield base, tmp_path
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=60) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    # The broker was shut down and its address withdrawn.
    assert not (instance / "broker" / "url").exists()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")),
                              options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def test_sign_in_upload_and_see_the_result(served_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    base, tmp_path = served_app
    image = tmp_path / "scan.png"
    image.write_bytes(image_bytes(size=(160, 120), seed=11))
    wait = WebDriverWait(browser, 60)

    browser.get(base + "/cases")
    assert "/login" in browser.current_url
    browser.find_element(By.NAME, "email").send_keys("doc@example.org")
    browser.find_element(By.NAME, "password").send_keys("password-123")
    browser.find_element(By.CSS_SELECTOR, "form.card button, form.card input[type=submit]").click()
    wait.until(EC.url_to_be(base + "/cases"))

    browser.get(base + "/cases/upload")
    browser.find_element(By.NAME, "images").send_keys(str(image))
    browser.find_element(By.NAME, "note").send_keys("browser test")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit][value=Upload]").click()

    # The case page polls the status endpoint and shows the result when the worker is done.
    wait.until(EC.text_to_be_present_in_element((By.ID, "result-h"), "Model output"))
    assert browser.find_element(By.ID, "case-status").text == "done"
    assert "tiny-demo" in browser.page_source
    assert browser.find_element(By.ID, "probability").text.endswith("%")
    heatmap = browser.find_element(By.ID, "heatmap")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap) == 160)

    # The opacity slider and the toggle act on the heatmap layer.
    slider = browser.find_element(By.ID, "heatmap-opacity")
    browser.execute_script("arguments[0].value = 80; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert heatmap.value_of_css_property("opacity") == "0.8"
    browser.find_element(By.ID, "heatmap-toggle").click()
    assert not heatmap.is_displayed()

    browser.get(base + "/cases")
    assert "scan.png" in browser.page_source and "done" in browser.page_source
