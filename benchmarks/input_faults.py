"""Malformed input for `benchmarks/faults.py` (issue 31): a form part without a name on every
POST route, and a DICOM deflate bomb, 1 MB on disk and 1 GiB inflated, built as a stream."""
from __future__ import annotations

import io
import time
from pathlib import Path

NAMELESS_ROUTES = ("/login", "/logout", "/cases/upload", "/admin/users", "/account/password",
                   "/api/v1/cases", "/api/v1/cases/1/reviews")


def deflate_bomb(zeros: int = 1 << 30) -> bytes:
    """An 8 x 8 ultrasound DICOM in Deflated Explicit VR Little Endian carrying ``zeros`` bytes
    of zeros in a private OB element: about 1 MB on disk for 1 GiB inflated. The data set is
    deflated as a stream, so making it never holds the inflated bytes."""
    import struct
    import zlib

    import numpy as np
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UltrasoundImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    ds.add_new(0x00111010, "LO", "padding")
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((8, 8), np.uint8).tobytes()
    plain = io.BytesIO()
    dcmwrite(plain, ds, enforce_file_format=True)
    data = plain.getvalue()
    group2_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    body = data[group2_end:]
    # the private element (0011,1011) OB sorts after (0011,1010): insert it there
    cut = body.index(b"\x11\x00\x10\x10") + 8 + len(b"padding ")
    deflated_meta = FileMetaDataset(meta)
    deflated_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, deflated_meta, enforce_standard=True)
    header = out.getvalue()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(body[:cut] + b"\x11\x00\x11\x10OB\x00\x00" + struct.pack("<I", zeros))]
    chunk = bytes(16 << 20)
    for _ in range(zeros // len(chunk)):
        parts.append(deflater.compress(chunk))
    parts.append(deflater.compress(bytes(zeros % len(chunk))))
    parts.append(deflater.compress(body[cut:]))
    parts.append(deflater.flush())
    return header + b"".join(parts)


def input_faults(client, bomb: bool = True) -> None:
    """Malformed input, before the kill stream: a form part without a name on every POST
    route (must be 400), and a DICOM deflate bomb upload (must be refused, memory bounded)."""
    boundary = "fault-boundary"
    body = f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--{boundary}--\r\n".encode()
    codes = {route: client.post(route, data=body, content_type=f"multipart/form-data; boundary={boundary}").status_code
             for route in NAMELESS_ROUTES}
    print("a form part without a name, per route: " + ", ".join(f"{r} {c}" for r, c in codes.items()))
    if not bomb:   # signed out, an upload only meets the sign-in page
        return
    bomb = deflate_bomb()
    before = _peak_rss_mb()
    t0 = time.perf_counter()
    response = client.post("/cases/upload", data={"images": [(io.BytesIO(bomb), "bomb.dcm")]}, follow_redirects=True)
    refused = b"expand to more than" in response.data
    print(f"DICOM deflate bomb ({len(bomb) / 1e6:.1f} MB file, 1 GiB inflated): {'refused' if refused else 'ACCEPTED'} "
          f"in {time.perf_counter() - t0:.2f} s; this process's peak RSS {before:.0f} -> {_peak_rss_mb():.0f} MB")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
