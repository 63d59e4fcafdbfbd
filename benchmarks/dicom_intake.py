#!/usr/bin/env python
"""DICOM intake cost in the web process (issue 12): time and peak memory of
`webapp.dicom.read_dicom` (read, de-identify, decode one frame, VOI, 8-bit, PNG) for one
mammogram-sized 12-bit frame with a window, and the same without a window (stretch).

The frame is smooth content with noise, as an X-ray is; each run is in a fresh child
process, its peak resident memory (VmHWM) reset just before the call.

    .venv/bin/python benchmarks/dicom_intake.py [--rows 4096] [--cols 5120]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from tests.webapp.test_dicom import dicom_bytes
from webapp.dicom import read_dicom

def vmhwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

rows, cols, windowed = {rows}, {cols}, {windowed}
yy, xx = np.mgrid[0:rows, 0:cols]
pixels = ((np.sin(xx / 300) + np.cos(yy / 200)) * 1000 + 2048
          + np.random.default_rng(0).normal(0, 50, (rows, cols))).clip(0, 4095).astype(np.uint16)
del yy, xx
data = dicom_bytes(pixels, bits=12, **(dict(WindowCenter=2048, WindowWidth=4096) if windowed else {{}}))
del pixels
import gc; gc.collect()
with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM: the peak of the call alone
    fh.write("5")
before = vmhwm()
start = time.perf_counter()
image = read_dicom(data, max_pixels=40_000_000)
print(f"{{'window' if windowed else 'stretch':8}} {{rows}}x{{cols}} 12-bit, {{len(data) / 1e6:.0f}} MB file: "
      f"{{time.perf_counter() - start:.2f}} s, peak {{vmhwm():.0f}} MB (before the call {{before:.0f}} MB), "
      f"PNG {{len(image.png) / 1e6:.1f}} MB")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=5120)
    args = parser.parse_args()
    for windowed in (True, False):
        code = CHILD.format(root=str(ROOT), rows=args.rows, cols=args.cols, windowed=windowed)
        subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    main()
