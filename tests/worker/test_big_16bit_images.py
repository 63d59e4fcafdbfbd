"""Issue 31, item 3: a large 16-bit image is reduced before its range is stretched to 8 bits,
in the worker's decode and in the web app's thumbnails; what comes out is the same picture
(its own range stretched, the dark lesion dark), small."""
from __future__ import annotations

import numpy as np
from PIL import Image


def _sixteen_bit_png(path, width: int = 3000, height: int = 2400):
    y, x = np.mgrid[0:height, 0:width]
    values = (20000 + 8000 * np.sin(x / 300.0)).astype(np.uint16)
    values[height // 3:height // 2, width // 3:width // 2] = 1000      # a dark lesion
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(path)
    return path


def test_the_worker_decodes_a_large_16_bit_png_small_with_its_range_stretched(tmp_path):
    from ml.data import to_rgb
    from worker.prediction import open_bounded

    import tracemalloc

    path = _sixteen_bit_png(tmp_path / "wide.png")
    tracemalloc.start()   # numpy's arrays are counted (Pillow's own buffers are not)
    with open_bounded(path, 512) as img:
        assert max(img.size) <= 512 and img.size[0] > img.size[1]
        rgb = np.asarray(to_rgb(img))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the full-size float64 copy the old path made was 3000 x 2400 x 8 bytes = 58 MB
    assert peak < 20e6, peak
    assert rgb.min() == 0 and rgb.max() == 255
    h, w = rgb.shape[:2]
    assert rgb[int(h * 0.42), int(w * 0.42)].max() < 10             # the lesion stays dark
    assert rgb[int(h * 0.8), int(w * 0.8)].min() > 100


def test_a_thumbnail_of_a_large_16_bit_image_is_stretched_and_small(app, tmp_path):
    from webapp.caselist import THUMBNAIL_PX, thumbnail_path
    from webapp.models import Case

    path = _sixteen_bit_png(tmp_path / "wide.png")
    store = app.extensions["file_store"]
    key, digest = store.put(path.read_bytes(), "images", ".png")
    with app.app_context():   # an unsaved row: the thumbnail needs only its image
        thumb = thumbnail_path(store, Case(image_key=key, image_sha256=digest, status="done"))
    assert thumb is not None
    with Image.open(thumb) as image:
        assert max(image.size) <= THUMBNAIL_PX
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 20 and pixels.max() > 235
