"""Issue 12, licences: the repository carries its licence, every page credits the CC BY
data, and nothing from BUS-UCLM (CC BY-NC 4.0) ships: no image, no model trained on it."""
from __future__ import annotations

import hashlib
import subprocess

import pytest

from webapp.config import PROJECT_ROOT

UCLM = PROJECT_ROOT.parent / "shared" / "data" / "bus-uclm"


def test_the_licence_file_is_apache_2():
    text = (PROJECT_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "Apache-2.0" in readme and "CC BY-NC 4.0" in readme and "CC BY 4.0" in readme


def test_every_page_credits_the_cc_by_data(client):
    page = client.get("/login").data.decode()
    assert "CC BY 4.0" in page and "doi:10.1016/j.dib.2019.104863" in page and "doi:10.1038/s41597-024-02984-z" in page


def _shipped_images():
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    return [PROJECT_ROOT / f for f in files.split() if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp"))]


@pytest.mark.skipif(not UCLM.is_dir(), reason="the BUS-UCLM copy in ../shared/data is not here")
def test_no_bus_uclm_image_ships_in_the_repository():
    uclm = {hashlib.sha256(p.read_bytes()).hexdigest() for p in UCLM.rglob("*") if p.is_file()}
    assert len(uclm) > 100
    shipped = _shipped_images()
    assert any(p.parent.name == "images" and p.parent.parent.name == "demo" for p in shipped)
    assert [str(p) for p in shipped if hashlib.sha256(p.read_bytes()).hexdigest() in uclm] == []


def test_the_demo_model_was_not_trained_on_bus_uclm():
    from ml.checkpoint import load_checkpoint

    meta = load_checkpoint(PROJECT_ROOT / "demo" / "model.pt")["meta"]
    text = repr({k: v for k, v in meta.items() if k not in ("history", "seen_images")}).lower()
    assert "busi" in text
    assert "uclm" not in text and "bus_uclm" not in text


@pytest.mark.skipif(not UCLM.is_dir(), reason="the BUS-UCLM copy in ../shared/data is not here")
def test_no_bus_uclm_image_is_among_the_demo_models_training_images():
    from ml.checkpoint import load_checkpoint

    seen = set(load_checkpoint(PROJECT_ROOT / "demo" / "model.pt")["meta"]["seen_images"]["sha256"])
    uclm = {hashlib.sha256(p.read_bytes()).hexdigest() for p in UCLM.rglob("*.png")}
    assert len(seen) > 800 and len(uclm) > 600
    assert not seen & uclm
