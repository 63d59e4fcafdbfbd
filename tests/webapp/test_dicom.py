"""DICOM intake (issue 12): small DICOM files written here with pydicom, read back as the
8-bit PNG the model and the page use, and de-identified before anything is stored.

The patient's name and ID given in a file are looked for, as bytes, in every stored file,
the database files, every page, the API's JSON and the feedback export."""
from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, ExplicitVRLittleEndian,
                         UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, generate_uid)
from sqlalchemy import select

from tests.apiclient import bearer, check_response, make_token
from tests.appfixtures import add_user, login, register_model, running_worker

PATIENT_NAME = "Zyxwvut^Quonsetta"
PATIENT_ID = "MRN-7741-QX"
# Other identifying values of the test file: none may be stored either.
SECRETS = ("Zyxwvut", "Quonsetta", "7741-QX", "19610203", "Quimbly", "Farnsworth", "ACC998877", "Ostrander")


# ------------------------------------------------------------------ writing DICOM files

def dicom_bytes(pixels, *, photometric: str = "MONOCHROME2", bits: int = 8, frames: int | None = None,
                syntax=None, identified: bool = True, pixel_data: bool = True, **attributes) -> bytes:
    """A DICOM Part 10 file (preamble and "DICM") of ``pixels`` (rows × cols, frames × rows
    × cols, or × 3 for colour), with a patient's name and other identifiers unless told."""
    arr = np.asarray(pixels)
    colour = photometric in ("RGB", "YBR_FULL", "YBR_FULL_422")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if frames else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    if identified:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19610203"
        ds.InstitutionName = "Quimbly General Hospital"
        ds.ReferringPhysicianName = "Farnsworth^Hubert"
        ds.AccessionNumber = "ACC998877"
        ds.OperatorsName = "Ostrander^Lee"
        ds.StudyDescription = f"Breast US {PATIENT_NAME}"
        ds.add_new(0x00091010, "LO", f"private copy of {PATIENT_ID}")  # a private tag
        item = Dataset()
        item.RequestedProcedureID, item.ScheduledPerformingPhysicianName = PATIENT_ID, "Ostrander^Lee"
        ds.RequestAttributesSequence = [item]
    shape = arr.shape[-3:-1] if colour else arr.shape[-2:]
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if frames:
        ds.NumberOfFrames = frames
    for name, value in attributes.items():
        setattr(ds, name, value)
    if pixel_data:
        ds.PixelData = arr.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
        if syntax is not None:
            ds.compress(syntax)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def ramp(rows: int = 64, cols: int = 64) -> np.ndarray:
    return np.tile(np.arange(cols, dtype=np.uint8) * (256 // cols), (rows, 1))


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def read(data: bytes, **kwargs):
    from webapp.dicom import read_dicom

    return read_dicom(data, max_pixels=kwargs.pop("max_pixels", 10_000_000), **kwargs)


# ------------------------------------------------------------------ pixels

def test_monochrome1_is_inverted():
    source = ramp()
    plain, inverted = read(dicom_bytes(source)), read(dicom_bytes(source, photometric="MONOCHROME1"))
    assert np.array_equal(png_pixels(plain.png), source)
    assert np.array_equal(png_pixels(inverted.png), 255 - source)
    assert inverted.meta["inverted"] is True and plain.meta["inverted"] is False


def test_16_bit_with_a_window_is_mapped_as_the_standard_says():
    # 16-bit values 0..8190; window centre 2048, width 4096 (PS3.3 C.11.2.1.2.1, LINEAR):
    # at or below c - 0.5 - (w-1)/2 = 0: black; above c - 0.5 + (w-1)/2 = 4095: white;
    # between: ((x - (c - 0.5)) / (w - 1) + 0.5) of the range.
    values = (np.arange(64 * 64, dtype=np.uint16) * 2).reshape(64, 64)
    image = read(dicom_bytes(values, bits=16, WindowCenter=2048, WindowWidth=4096))
    out = png_pixels(image.png)
    assert out.dtype == np.uint8 and out.shape == (64, 64)

    def expected(x):
        if x <= 0:
            return 0
        if x > 4095:
            return 255
        return round(((x - 2047.5) / 4095 + 0.5) * 255)

    for x in (0, 2, 1024, 2048, 3072, 4094, 4096, 8190):
        row, col = divmod(x // 2, 64)
        assert abs(int(out[row, col]) - expected(x)) <= 1, (x, out[row, col], expected(x))
    assert image.meta["voi"] == "window centre 2048, width 4096" and image.meta["bits_stored"] == 16


def test_12_bit_without_a_window_is_stretched_from_minimum_to_maximum():
    values = (np.arange(64 * 64, dtype=np.uint16) % 4096).reshape(64, 64) // 4 + 100  # 100..1123
    out = png_pixels(read(dicom_bytes(values, bits=12)).png)
    assert out.min() == 0 and out.max() == 255
    assert out[0, 0] == 0 and abs(int(out[8, 0]) - round((values[8, 0] - 100) / 1023 * 255)) <= 1


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes_decode_to_the_same_pixels(syntax):
    source = ramp()
    image = read(dicom_bytes(source, syntax=syntax))
    assert np.array_equal(png_pixels(image.png), source)
    assert image.meta["transfer_syntax"] == syntax.name


def _solid(rgb, size=64):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (size, size, 3)).copy()


def test_jpeg_baseline_ybr_and_native_ybr_become_rgb():
    colour = (200, 40, 60)
    buffer = io.BytesIO()
    Image.fromarray(_solid(colour)).save(buffer, format="JPEG", quality=95)  # YCbCr 4:2:0 inside
    jpeg = dicom_bytes(_solid(colour), photometric="YBR_FULL_422", pixel_data=False)
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(jpeg))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    for data in (out.getvalue(),
                 dicom_bytes(convert_color_space(_solid(colour), "RGB", "YBR_FULL"), photometric="YBR_FULL")):
        pixels = png_pixels(read(data).png)
        assert pixels.shape == (64, 64, 3)
        assert np.abs(pixels.reshape(-1, 3).mean(axis=0) - colour).max() < 6, pixels[0, 0]


def test_a_cine_clip_gives_its_middle_frame():
    frames = np.stack([np.full((32, 48), 40 * i, dtype=np.uint8) for i in range(5)])
    image = read(dicom_bytes(frames, frames=5))
    assert (png_pixels(image.png) == 80).all()  # frame 3 of 5 (index 2)
    assert (image.meta["frames"], image.meta["frame_shown"], image.width, image.height) == (5, 3, 48, 32)
    two = read(dicom_bytes(np.stack([np.zeros((32, 32)), np.full((32, 32), 9)]), frames=2))
    assert (png_pixels(two.png) == 9).all() and two.meta["frame_shown"] == 2


# ------------------------------------------------------------------ de-identification

def test_the_profile_removes_and_replaces_identifying_attributes_everywhere():
    from pydicom import dcmread

    from webapp.dicom import DEIDENTIFY_ACTIONS, deidentify

    ds = dcmread(io.BytesIO(dicom_bytes(ramp()[:8, :8], Manufacturer="Acme", BurnedInAnnotation="YES")))
    ds.add_new(0x60003000, "OW", b"\x00" * 8)  # overlay data
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ref.ContentCreatorName = PATIENT_NAME  # a name inside a sequence the table keeps
    ds.ReferencedSeriesSequence = [ref]
    study, instance = ds.StudyInstanceUID, ds.SOPInstanceUID
    deidentify(ds, b"site-salt")

    assert ds.PatientName == "" and ds.PatientID == "" and ds.PatientBirthDate == ""
    assert ds.AccessionNumber == "" and ds.ReferringPhysicianName == ""
    for gone in ("InstitutionName", "OperatorsName", "StudyDescription", "RequestAttributesSequence"):
        assert gone not in ds
    assert not any(elem.tag.is_private for elem in ds) and 0x60003000 not in ds
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    # UIDs: replaced, the same old one by the same new one, standard ones kept.
    assert ds.StudyInstanceUID != study and ds.SOPInstanceUID != instance
    assert ds.ReferencedSeriesSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == UltrasoundImageStorage
    assert ds.ReferencedSeriesSequence[0].ContentCreatorName == ""
    # Kept: what the page shows.
    assert ds.Manufacturer == "Acme" and ds.BurnedInAnnotation == "YES" and ds.Modality == "US"
    text = str(ds) + str(ds.file_meta)
    assert not [s for s in SECRETS if s.lower() in text.lower()]
    assert {"PatientName": "Z", "PatientID": "Z", "InstitutionName": "X",
            "StudyInstanceUID": "U"}.items() <= DEIDENTIFY_ACTIONS.items()
    from pydicom.datadict import tag_for_keyword

    # A misspelt keyword would silently protect nothing.
    assert [k for k in DEIDENTIFY_ACTIONS if tag_for_keyword(k) is None] == []


def test_the_patient_key_is_kept_only_with_a_secret_and_is_stable():
    from webapp.dicom import read_dicom

    one = dicom_bytes(ramp())
    other_name_same_id = dicom_bytes(ramp(), PatientName="Other^Name")
    other_patient = dicom_bytes(ramp(), PatientID="MRN-0001")
    assert read(one).patient_key is None
    keys = [read(d, patient_key_secret="site-secret").patient_key for d in (one, other_name_same_id, other_patient)]
    assert keys[0] == keys[1] != keys[2] and len(keys[0]) == 32
    assert read(one, patient_key_secret="another-site").patient_key != keys[0]
    assert read_dicom(dicom_bytes(ramp(), identified=False), max_pixels=10**6,
                      patient_key_secret="site-secret").patient_key is None


# ------------------------------------------------------------------ through the app

def _page_upload(client, *files, follow_redirects=False, **fields):
    return client.post("/cases/upload", data={"images": [(io.BytesIO(c), n) for n, c in files], **fields},
                       follow_redirects=follow_redirects)


def _cases(app):
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        return db.session.scalars(select(Case).order_by(Case.id)).all()


def _all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(Path(folder).rglob("*")) if p.is_file()]


def _leaks(blob: bytes) -> list[str]:
    lowered = blob.lower()
    return [s for s in SECRETS if s.lower().encode() in lowered]


def test_missing_pixel_data_is_refused_clearly_and_nothing_is_stored(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    response = _page_upload(client, ("report.dcm", dicom_bytes(ramp(), pixel_data=False)))
    assert response.status_code == 400
    assert "report.dcm was not accepted: the DICOM file holds no image (no Pixel Data)" in response.data.decode()
    assert _cases(app) == []
    storage = Path(app.config["STORAGE_DIR"])
    assert not (storage / "images").exists() or not any((storage / "images").rglob("*.png"))

    api = client.post("/api/v1/cases", headers=bearer(make_token(app, "doc@example.org")),
                      data={"images": [(io.BytesIO(dicom_bytes(ramp(), pixel_data=False)), "a.dcm"),
                                       (io.BytesIO(b"\0" * 128 + b"DICM" + b"\xff" * 40), "b.dcm")]})
    assert api.status_code == 400
    reasons = [r["reason"] for r in api.get_json()["rejected"]]
    assert "no Pixel Data" in reasons[0] and "not a readable DICOM file" in reasons[1]
    assert _cases(app) == []


def test_the_same_limits_apply_to_dicom(make_app):
    app = make_app(MAX_IMAGE_PIXELS=1000, MAX_IMAGE_BYTES=60_000)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    response = _page_upload(client, ("big.dcm", dicom_bytes(ramp())), ("huge.dcm", dicom_bytes(np.zeros((256, 256)))))
    text = response.data.decode()
    assert response.status_code == 400
    assert "big.dcm was not accepted: the image has 64×64 pixels; the limit is 1,000 pixels" in text
    assert "huge.dcm was not accepted: the file is 0.1 MB; the limit is 0.1 MB per image" in text
    assert _cases(app) == []


def test_the_same_image_in_another_dicom_file_is_a_duplicate(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    first = _page_upload(client, ("a.dcm", dicom_bytes(ramp())))
    assert first.status_code == 303
    # Other UIDs, another patient: the same pixels are the same image (sha256 of the PNG).
    again = _page_upload(client, ("b.dcm", dicom_bytes(ramp(), PatientName="Someone^Else")), follow_redirects=True)
    assert re.search(r"DICOM image [0-9a-f]{8} is the same image as", again.data.decode())
    cases = _cases(app)
    assert len(cases) == 1 and cases[0].source_format == "DICOM" and cases[0].image_format == "PNG"
    stored = app.extensions["file_store"].path(cases[0].image_key).read_bytes()
    import hashlib

    assert cases[0].image_sha256 == hashlib.sha256(stored).hexdigest()
    assert np.array_equal(png_pixels(stored), ramp())


def test_the_case_page_shows_the_metadata_frame_rule_and_burned_in_annotation(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    region = Dataset()
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.0125
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "399067008", "SCT", "transverse"
    clip = np.stack([np.full((32, 40), 10 * i, dtype=np.uint8) for i in range(7)])
    data = dicom_bytes(clip, frames=7, Manufacturer="Acme Sonics", ManufacturerModelName="Sono 9",
                       ImageLaterality="L", BurnedInAnnotation="YES", SequenceOfUltrasoundRegions=[region],
                       ViewCodeSequence=[view])
    response = _page_upload(client, ("clip.dcm", data), follow_redirects=True)
    assert response.status_code == 200
    page = response.data.decode()
    assert 'id="burned-in-warning"' in page and "BurnedInAnnotation = YES" in page
    # the view is its code: the file's CodeMeaning is free text and is never shown
    for shown in ("Acme Sonics · Sono 9", "left", "code SCT 399067008", "0.125 × 0.125 mm", "frame 4 of 7",
                  "the middle frame of the clip", "US"):
        assert shown in page, shown
    plain = _page_upload(client, ("plain.png", _png()), follow_redirects=True).data.decode()
    assert 'id="dicom-meta"' not in plain
    no_flag = _page_upload(client, ("quiet.dcm", dicom_bytes(ramp(), BurnedInAnnotation="NO")),
                           follow_redirects=True).data.decode()
    assert 'id="dicom-meta"' in no_flag and 'id="burned-in-warning"' not in no_flag


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_name_and_id_are_nowhere_after_upload_prediction_review_and_export(make_app, tiny_checkpoint, tmp_path):
    """The patient's name, ID and other identifiers of a DICOM file are absent from every
    stored file, the database, every page, the API and the feedback export."""
    from webapp.extensions import db
    from worker.feedback import export_feedback

    app = make_app(DICOM_PATIENT_KEY_SECRET="site-secret")
    register_model(app, tiny_checkpoint, name="tiny-1")
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    add_user(app, "boss@example.org", "admin")
    doc, rev = make_token(app, "doc@example.org"), make_token(app, "rev@example.org")
    client = app.test_client()
    document = client.get("/api/v1/openapi.json", headers=bearer(doc)).get_json()
    data = dicom_bytes(ramp(), syntax=RLELossless, Manufacturer="Acme Sonics", BurnedInAnnotation="YES")
    assert PATIENT_NAME.encode() in data and PATIENT_ID.encode() in data
    page_client = app.test_client()
    login(page_client, "doc@example.org")
    with running_worker(app):
        created = client.post("/api/v1/cases", headers=bearer(doc),
                              data={"images": [(io.BytesIO(data), f"Zyxwvut_Quonsetta_{PATIENT_ID}.dcm")]})
        assert created.status_code == 201, created.data
        check_response(document, "POST", "/api/v1/cases", created)
        case = created.get_json()["cases"][0]
        # The page takes it too (a second case: "Upload again").
        assert _page_upload(page_client, ("scan.dcm", data), allow_duplicate="y").status_code == 303
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = [c.status for c in _cases(app)]
            if all(s in ("done", "failed") for s in states):
                break
            time.sleep(0.1)
    assert [c.status for c in _cases(app)] == ["done", "done"], [c.error for c in _cases(app)]
    assert case["original_filename"].startswith("DICOM image ") and case["source_format"] == "DICOM"
    assert case["dicom"]["manufacturer"] == "Acme Sonics" and case["dicom"]["burned_in_annotation"] == "YES"
    assert case["dicom"]["patient_key"] and len(case["dicom"]["patient_key"]) == 32

    review = client.post(f"/api/v1/cases/{case['id']}/reviews", headers=bearer(rev),
                         json={"verdict": "agree", "confidence": "certain"})
    assert review.status_code == 201, review.data

    api_bodies = [client.get(f"/api/v1/cases/{case['id']}", headers=bearer(doc)),
                  client.get("/api/v1/cases", headers=bearer(rev)), created, review]
    for response in api_bodies[:2]:
        check_response(document, "GET", response.request.path, response)
    pages = []
    for email, paths in (("doc@example.org", [f"/cases/{case['id']}", "/cases", "/cases/upload"]),
                         ("rev@example.org", ["/reviews", f"/cases/{case['id'] + 1}", "/cases"]),
                         ("boss@example.org", ["/admin/audit", "/cases"])):
        browser = app.test_client()
        login(browser, email)
        for path in paths:
            response = browser.get(path)
            assert response.status_code == 200, (email, path)
            pages.append((f"{email} {path}", response.data))
    assert any(b"Acme Sonics" in body for _, body in pages)
    for name, body in pages + [(r.request.path, r.data) for r in api_bodies]:
        assert not _leaks(body), name

    out = tmp_path / "export"
    with app.app_context():
        exported = export_feedback(out)
        assert len(exported.items) == 1
        db.engine.dispose()
    # the export keeps the pseudonym (so retraining can keep a patient on one side of its split)
    manifest = (out / "manifest.csv").read_text().splitlines()
    header, row = manifest[0].split(","), manifest[1].split(",")
    assert row[header.index("patient_key")] == case["dicom"]["patient_key"]
    files = _all_bytes(out) + _all_bytes(Path(app.config["STORAGE_DIR"])) + _all_bytes(Path(app.config["INSTANCE_PATH"]))
    assert any(p.suffix == ".png" for p, _ in _all_bytes(out))
    # Positive controls: the database files hold this case's kept metadata, the store its PNG.
    assert any(b"Acme Sonics" in blob for p, blob in files if p.name.startswith("app.db"))
    assert any(p.suffix == ".png" for p, _ in _all_bytes(Path(app.config["STORAGE_DIR"])))
    leaking = [(str(p), _leaks(blob)) for p, blob in files if _leaks(blob)]
    assert leaking == []
    with app.app_context():
        from webapp.models import AuditEvent

        events = db.session.scalars(select(AuditEvent).where(AuditEvent.action == "case.upload")).all()
        assert [e.details.get("source") for e in events] == ["DICOM", "DICOM"]


# ------------------------------------------------------------------ issue 31: bombs and names

def deflated_dicom(padding_bytes: int) -> bytes:
    """An 8 x 8 ultrasound image in Deflated Explicit VR Little Endian, carrying
    ``padding_bytes`` of zeros in a private OB element: tiny on disk, large inflated."""
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(io.BytesIO(dicom_bytes(ramp(8, 8), identified=False)))
    ds.add_new(0x00111010, "LO", "padding")
    ds.add_new(0x00111011, "OB", b"\0" * padding_bytes)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_a_deflate_bomb_is_refused_before_it_is_inflated(make_app):
    import tracemalloc

    from webapp.dicom import DicomRejected, read_dicom

    small = deflated_dicom(1024)
    assert png_pixels(read(small).png).shape == (8, 8)          # a normal deflated file still reads
    bomb = deflated_dicom(64 * 1024 * 1024)
    assert len(bomb) < 200_000
    tracemalloc.start()
    with pytest.raises(DicomRejected, match="expand to more than 16 MB"):
        read_dicom(bomb, max_pixels=10_000_000, max_expanded_bytes=16 * 1024 * 1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak                         # the check never held the inflated data

    app = make_app(DICOM_MAX_EXPANDED_BYTES=16 * 1024 * 1024)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    response = _page_upload(client, ("bomb.dcm", bomb), follow_redirects=True)
    assert "bomb.dcm was not accepted" in response.data.decode() and "expand to more than 16 MB" in response.data.decode()
    assert _cases(app) == []


JANETTE = dict(PatientName="Doe^Janette^Quinby", PatientID="MRN-7741-XQZ", PatientBirthDate="19610412",
               InstitutionName="Saint Exampleton Hospital")
JANETTE_NAMES = ["JANETTE DOE 1961-04-12.dcm", "mrn7741xqz.dcm", "Saint_Exampleton_Hospital_Quinby.dcm",
                 "Doe, Janette (12.04.1961).dcm"]


def test_a_dicom_upload_keeps_no_file_name_and_no_free_text_view(app, client):
    from webapp.models import Case

    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "399162004", "SCT", "cranio-caudal Doe Janette"
    for k, name in enumerate(JANETTE_NAMES):
        data = dicom_bytes(ramp() + k, identified=False, ViewCodeSequence=[view], **JANETTE)
        assert _page_upload(client, (name, data)).status_code == 303
    with app.app_context():
        cases = db_cases(app)
        assert len(cases) == 4
        for case in cases:
            assert case.original_filename.startswith("DICOM image ")
            assert case.dicom_meta["view"] == "cranio-caudal"
    for case_id in range(1, 5):
        page = client.get(f"/cases/{case_id}").data.decode()
        for secret in ("Janette", "JANETTE", "Doe", "Quinby", "7741", "1961", "Exampleton"):
            assert secret not in page, (case_id, secret)


def db_cases(app):
    from webapp.extensions import db
    from webapp.models import Case

    return list(db.session.scalars(select(Case).order_by(Case.id)))


def test_an_unknown_view_code_is_shown_as_its_code_never_its_meaning():
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "12345", "99LOCAL", "transverse Doe Janette"
    meta = read(dicom_bytes(ramp(), identified=False, ViewCodeSequence=[view])).meta
    assert meta["view"] == "code 99LOCAL 12345"


@pytest.mark.parametrize("uploaded,shown", [
    ("JANETTE DOE 1961-04-12.png", "JANETTE DOE x.png"), ("mrn7741xqz.png", "x.png"),
    ("Doe, Janette (12.04.1961).png", "Doe, Janette (x).png"), ("MRN-7741-XQZ.jpg", "x.jpg"),
    ("scan 19610412.png", "scan x.png"), ("busi_malignant_080.png", "busi_malignant_080.png"),
    ("benign (12).png", "benign (12).png")])
def test_image_file_names_lose_dates_and_identifier_like_tokens(uploaded, shown):
    from webapp.intake import display_name

    assert display_name(uploaded) == shown


@pytest.mark.parametrize("attributes", [{"WindowCenter": 2048, "WindowWidth": 4096}, {},
                                        {"RescaleSlope": 2, "RescaleIntercept": -100}])
def test_pixels_converted_in_blocks_of_rows_equal_the_whole_frame_at_once(attributes, monkeypatch):
    """Issue 31, item 3: the 16-bit conversion runs on blocks of rows (a 6300 x 6300 RLE frame
    converted whole took 795 MB); the blocks must join into exactly the whole-frame result,
    the min-max stretch included (its range comes from every block)."""
    import tracemalloc

    import webapp.dicom as dicom

    rng = np.random.default_rng(3)
    values = rng.integers(0, 4096, (300, 200), dtype=np.uint16)
    values[250:, :] += 2000          # the maximum lies in the last block only
    data = dicom_bytes(values, bits=16, **attributes)
    peaks = {}
    for rows in (10_000, 32):
        monkeypatch.setattr(dicom, "BLOCK_ROWS", rows)
        tracemalloc.start()
        peaks[rows] = (png_pixels(read(data).png), tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    (whole, whole_peak), (blocked, blocked_peak) = peaks[10_000], peaks[32]
    assert np.array_equal(whole, blocked)
    # whole-frame float copies gone: measured here 0.93 MB saved with a window, 0.63 MB with
    # a rescale, 0.17 MB without either (no float64 copy to save then, only a float32 one)
    assert blocked_peak < whole_peak - 300 * 200 * 2, (whole_peak, blocked_peak)
