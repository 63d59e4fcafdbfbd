"""DICOM intake: de-identify an uploaded DICOM file and turn one frame into an 8-bit PNG.

What the rest of the app gets from a DICOM upload is a `DicomImage`: the PNG (the only
file stored, shown, sent to the worker and exported), a few non-identifying metadata
values taken from the *de-identified* dataset, the BurnedInAnnotation flag and, only when
``DICOM_PATIENT_KEY_SECRET`` is set, a per-site pseudonymous patient key. The DICOM file
itself is never written anywhere: nothing identifying survives the request.

De-identification (PS3.15 Annex E, the Basic Application Level Confidentiality Profile,
and stricter than its table) is `webapp.dicom_deidentify`, whose names are re-exported
here; it runs before anything else reads the file. Then only a whitelist of display
metadata is kept (`_display_metadata`), so even an attribute the table misses never reaches
the database.

Pixel rules (PS3.3 C.7.6.3, C.11): the Modality LUT (or rescale slope/intercept) then the
VOI LUT or window centre/width are applied with pydicom; without a VOI the values are
stretched from their minimum to their maximum (8-bit data is kept as it is); the result
is scaled to 0-255. MONOCHROME1 (and a Presentation LUT Shape of INVERSE) is inverted so
that white is dense; YBR colour is converted to RGB, palette colour through its LUT.
A multi-frame file (a cine clip) gives one image: its middle frame (frame ``n // 2 + 1``
of ``n``, counting from 1), shown on the case page as "frame k of n".
"""
from __future__ import annotations

import io
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID

from webapp.dicom_deidentify import _values, deidentify, patient_key
from webapp.dicom_deidentify import (DEIDENTIFICATION_METHOD, DEIDENTIFY_ACTIONS, _DUMMY,  # noqa: F401 (re-exported)
                                     _REMOVED_GROUPS, _deidentify_dataset, _is_standard_uid, _new_uid)

#: Where a DICOM Part 10 file carries its magic bytes, after the 128-byte preamble.
MAGIC_OFFSET = 128
MAGIC = b"DICM"


class DicomRejected(ValueError):
    """A DICOM file that cannot become a case; the message says why, for the uploader."""


@dataclass
class DicomImage:
    """What an upload keeps of a DICOM file: the PNG and non-identifying facts."""

    png: bytes
    width: int
    height: int
    meta: dict[str, Any] = field(default_factory=dict)
    burned_in_annotation: bool | None = None  # YES / NO / not stated
    patient_key: str | None = None


def looks_like_dicom(data: bytes, filename: str | None = None) -> bool:
    """A DICOM Part 10 file ("DICM" after the preamble), or a file named ``*.dcm``."""
    if data[MAGIC_OFFSET:MAGIC_OFFSET + 4] == MAGIC:
        return True
    return bool(filename) and filename.lower().rstrip().endswith((".dcm", ".dicom"))


# ------------------------------------------------------------------ pixels

def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """The range pydicom's windowing maps onto (pydicom.pixels.processing.apply_windowing:
    the stored range, through the Modality LUT or rescale)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return min(low, high), max(low, high)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    # float32 and in place: a 20-megapixel mammogram stays at 80 MB per copy here.
    scaled = values.astype(np.float32)
    scaled -= np.float32(low)
    scaled *= np.float32(255.0 / (high - low))
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


# Rows converted at a time: the LUTs work in float64, so a 6300 x 6300 16-bit frame converted
# whole took 795 MB beyond its decode; in blocks of 256 rows it takes about 13 MB.
BLOCK_ROWS = 256


def _blocks(frame: np.ndarray):
    for start in range(0, frame.shape[0], BLOCK_ROWS):
        yield slice(start, start + BLOCK_ROWS)


def _grey_to_8bit(frame: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Modality LUT, VOI (LUT or window), 8-bit scaling; returns the pixels and which VOI
    rule was used, in words. Every step is a point operation, so it runs on blocks of rows
    (``BLOCK_ROWS``) into one 8-bit image; only the min-max stretch needs a first pass."""
    out = np.empty(frame.shape, dtype=np.uint8)
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
        for rows in _blocks(frame):
            out[rows] = _to_uint8(apply_voi_lut(apply_modality_lut(frame[rows], ds), ds, index=0), 0, 2**bits - 1)
        return out, "VOI LUT"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = (_values(ds.WindowCenter)[0], _values(ds.WindowWidth)[0])
        low, high = _voi_output_range(ds)
        for rows in _blocks(frame):
            out[rows] = _to_uint8(apply_voi_lut(apply_modality_lut(frame[rows], ds), ds, index=0), low, high)
        return out, f"window centre {float(centre):g}, width {float(width):g}"
    if int(ds.BitsStored) <= 8 and ds.get("RescaleSlope") in (None, 1) and not ds.get("RescaleIntercept"):
        return apply_modality_lut(frame, ds).astype(np.uint8), "8-bit values as stored"
    ranges = [(float(np.min(v)), float(np.max(v))) for v in (apply_modality_lut(frame[rows], ds) for rows in _blocks(frame))]
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    for rows in _blocks(frame):
        out[rows] = _to_uint8(apply_modality_lut(frame[rows], ds), low, high)
    return out, "stretched from minimum to maximum"


def _colour_to_8bit(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    bits = int(ds.get("BitsStored", 16)) if ds.PhotometricInterpretation != "PALETTE COLOR" else 16
    return _to_uint8(frame, 0, 2**bits - 1)


#: What a deflated DICOM file may inflate to by default (``DICOM_MAX_EXPANDED_MB``).
MAX_EXPANDED_BYTES = 256 * 1024 * 1024
DEFLATED = "1.2.840.10008.1.2.1.99"   # Deflated Explicit VR Little Endian


def check_inflated_size(data: bytes, limit: int) -> None:
    """Refuse a Deflated Explicit VR Little Endian file whose data set inflates to more than
    ``limit`` bytes, before pydicom inflates it whole: a 1 MB file of zeros can otherwise
    take gigabytes of memory (a deflate bomb). Inflated in 1 MB steps and counted, so this
    check itself holds at most about 1 MB. Other transfer syntaxes expand only by their pixel
    data, which the pixel limit bounds, and only one frame is decoded."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, force=data[MAGIC_OFFSET:MAGIC_OFFSET + 4] != MAGIC)
        syntax = str(_read_file_meta_info(fp).get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - not readable here: dcmread says why, in its own words
        return
    if syntax != DEFLATED:
        return
    inflater, pending, total = zlib.decompressobj(-zlib.MAX_WBITS), data[fp.tell():], 0
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, 1 << 20))
            if total > limit:
                raise DicomRejected(f"its compressed (deflated) data expand to more than {limit // (1024 * 1024)} MB; "
                                    "an ultrasound image needs far less, so the file was refused unread")
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DicomRejected(f"its deflated data are damaged ({exc})") from None


def read_dicom(data: bytes, *, max_pixels: int, patient_key_secret: str | None = None,
               uid_salt: bytes = b"breast-review", max_expanded_bytes: int = MAX_EXPANDED_BYTES) -> DicomImage:
    """De-identify ``data`` (a DICOM file) and return its image as a PNG; raise
    DicomRejected with a message for the uploader when it cannot be used (including a
    deflated file that would inflate beyond ``max_expanded_bytes``)."""
    check_inflated_size(data, max_expanded_bytes)
    # pydicom warns about every small deviation from the standard that it can read past;
    # what it cannot read past raises, and that is what the uploader is told.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_dicom(data, max_pixels, patient_key_secret, uid_salt)


def _read_dicom(data: bytes, max_pixels: int, patient_key_secret: str | None, uid_salt: bytes) -> DicomImage:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[MAGIC_OFFSET:MAGIC_OFFSET + 4] != MAGIC)
    except InvalidDicomError as exc:
        raise DicomRejected(f"it is not a readable DICOM file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file raises many kinds of error
        raise DicomRejected(f"it is not a readable DICOM file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(ds, Dataset) or len(ds) == 0:
        raise DicomRejected("it is not a readable DICOM file")
    # Everything identifying is taken now, then removed before anything else happens.
    key = patient_key(ds, patient_key_secret)
    try:
        deidentify(ds, uid_salt)
    except Exception as exc:  # noqa: BLE001 - a file we cannot clean is a file we refuse
        raise DicomRejected(f"its attributes could not be read to de-identify it ({exc})") from None

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomRejected("the DICOM file holds no image (no Pixel Data): it may be a report, "
                            "a structured document or a presentation state; send the image itself")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        photometric = str(ds.PhotometricInterpretation).upper()
        bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomRejected(f"the image attributes are missing or invalid ({exc})") from None
    if rows * cols > max_pixels:
        raise DicomRejected(f"the image has {cols}×{rows} pixels; the limit is {max_pixels:,} pixels")
    if rows < 8 or cols < 8:
        raise DicomRejected(f"the image is only {cols}×{rows} pixels")
    frames = _frame_count(ds)
    index = frames // 2  # the middle frame of a cine clip (the first when there is one)
    try:
        frame = pixel_array(ds, index=index)
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds; all mean "cannot read"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DicomRejected(f"its pixel data could not be decoded ({UID(str(syntax)).name if syntax else 'unknown transfer syntax'}: "
                            f"{exc})") from None

    inverted = False
    try:
        if photometric.startswith("MONOCHROME"):
            if frame.ndim != 2:
                raise DicomRejected(f"a {photometric} image with {frame.ndim} dimensions per frame is not supported")
            pixels, voi = _grey_to_8bit(frame, ds)
            inverted = photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
            if inverted:
                pixels = 255 - pixels
        else:
            if photometric == "PALETTE COLOR":
                frame = apply_color_lut(frame, ds)
            # pydicom converts YBR_FULL and YBR_FULL_422 to RGB when it decodes (as_rgb);
            # JPEG and JPEG 2000 decoders return RGB for YBR_ICT, YBR_RCT and YBR_PARTIAL.
            if frame.ndim != 3 or frame.shape[-1] != 3:
                raise DicomRejected(f"a {photometric} image of shape {frame.shape} is not supported")
            pixels, voi = _colour_to_8bit(frame, ds), "colour"
    except DicomRejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DicomRejected(f"its pixel values could not be converted ({exc})") from None

    buffer = io.BytesIO()
    # zlib level 3: a 21-megapixel mammogram encodes in 1.4 s instead of 10 s (level 6,
    # Pillow's default) for a file 13 % larger; this runs in the web request.
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=3)  # L or RGB
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    meta = _display_metadata(ds)
    meta.update({"frames": frames, "frame_shown": index + 1, "photometric": photometric,
                 "bits_stored": bits_stored, "voi": voi, "inverted": inverted,
                 "burned_in_annotation": burned if burned in ("YES", "NO") else None, "deidentified": "PS3.15 Annex E basic profile"})
    return DicomImage(png=buffer.getvalue(), width=cols, height=rows, meta=meta,
                      burned_in_annotation={"YES": True, "NO": False}.get(burned),
                      patient_key=key)


# ------------------------------------------------------------------ metadata

def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = "\\".join(str(v) for v in _values(value)).strip()
    text = "".join(ch for ch in text if ch.isprintable())[:limit]
    return text or None


def _pixel_spacing(ds: Dataset) -> tuple[list[float] | None, str | None]:
    """Row and column spacing in mm, and where it came from."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(_values(value)) == 2:
            try:
                return [round(float(v), 6) for v in _values(value)], keyword
            except (TypeError, ValueError):
                pass
    # Ultrasound: the calibrated region's physical size of one pixel (units 3 = cm).
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        try:
            if int(region.PhysicalUnitsXDirection) == 3 and int(region.PhysicalUnitsYDirection) == 3:
                return [round(float(region.PhysicalDeltaY) * 10, 6),
                        round(float(region.PhysicalDeltaX) * 10, 6)], "ultrasound region"
        except (AttributeError, TypeError, ValueError):
            continue
    return None, None


# The commonest view codes (PS3.16 CID 4014, "View for Mammography"), by coding scheme and
# code value; any other code is shown as its code: the only view text shown is ours, never a CodeMeaning from the file,
# which is free text and has carried a patient's name.
VIEW_CODES = {
    ("SRT", "R-10242"): "cranio-caudal", ("SCT", "399162004"): "cranio-caudal",
    ("SRT", "R-10226"): "medio-lateral oblique", ("SCT", "399368009"): "medio-lateral oblique",
    ("SRT", "R-10224"): "medio-lateral", ("SCT", "399260004"): "medio-lateral",
    ("SRT", "R-10228"): "latero-medial", ("SCT", "399352003"): "latero-medial",
}
_CODE = re.compile(r"[A-Za-z0-9.\-]{1,16}")


def _view(ds: Dataset) -> str | None:
    """ViewPosition (a coded string: CC, MLO, ...), else the first ViewCodeSequence item as a
    known view's name or its bare code ("code SCT 12345"). CodeMeaning is never read."""
    view = _text(ds, "ViewPosition", 16)
    if view and re.fullmatch(r"[A-Z0-9 _]{1,16}", view):
        return view
    for item in ds.get("ViewCodeSequence") or []:
        scheme, value = (_text(item, "CodingSchemeDesignator", 16) or "", _text(item, "CodeValue", 16) or "")
        if (scheme, value) in VIEW_CODES:
            return VIEW_CODES[scheme, value]
        if _CODE.fullmatch(scheme) and _CODE.fullmatch(value):
            return f"code {scheme} {value}"
    return None


def _display_metadata(ds: Dataset) -> dict[str, Any]:
    """The non-identifying facts shown on the case page (a whitelist, read from the
    de-identified dataset)."""
    spacing, source = _pixel_spacing(ds)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "modality": _text(ds, "Modality", 16),
        "manufacturer": _text(ds, "Manufacturer"),
        "model": _text(ds, "ManufacturerModelName"),
        "laterality": _text(ds, "ImageLaterality", 16) or _text(ds, "Laterality", 16),
        "view": _view(ds),
        "body_part": _text(ds, "BodyPartExamined", 16),
        "pixel_spacing_mm": spacing,
        "pixel_spacing_source": source,
        "transfer_syntax": UID(str(syntax)).name if syntax else None,
    }
