import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

from ml.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from ml.inference import Predictor
from ml.model import WeightsUnavailableError, build_model
from tests.ml.conftest import tiny_meta


def test_model_has_one_logit():
    model = build_model("none").eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 1)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("none").eval()
    return model, save_checkpoint(tmp_path / "m.pt", model, tiny_meta(threshold=0.3))


def test_round_trip_gives_identical_outputs(saved, tmp_path):
    model, path = saved
    loaded, meta = load_model(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["threshold"] == 0.3 and meta["versions"]["torch"] == str(torch.__version__)
    assert "created_at" in meta and meta["stored_dtype"] == "float32"


def test_float16_checkpoint_is_half_the_size_and_close(saved, tmp_path):
    model, path = saved
    half = save_checkpoint(tmp_path / "h.pt", model, tiny_meta(), half=True)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    loaded, meta = load_model(half)
    assert meta["stored_dtype"] == "float16"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=5e-2)


def test_truncated_checkpoint_is_a_clear_error(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)


def test_missing_empty_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(2000))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")


def test_foreign_torch_file_and_pickles_are_refused(tmp_path):
    torch.save(models.resnet18().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a breast-review checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    # a pickle that would run code when unpickled must not be executed
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_inconsistent_metadata_is_refused(tmp_path):
    meta = tiny_meta()
    meta["architecture"] = "vgg16"
    save_checkpoint(tmp_path / "a.pt", build_model("none"), meta)
    with pytest.raises(CheckpointError, match="architecture"):
        load_checkpoint(tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="lacks threshold"):
        save_checkpoint(tmp_path / "b.pt", build_model("none"), {k: v for k, v in tiny_meta().items() if k != "threshold"})


def test_weights_from_a_local_file(saved, tmp_path):
    model, path = saved
    from_ckpt = build_model(path).eval()
    assert torch.equal(from_ckpt.conv1.weight, model.conv1.weight)
    # a torchvision ImageNet-shaped state dict: backbone kept, 1000-way fc dropped
    plain = models.resnet18()
    torch.save(plain.state_dict(), tmp_path / "imagenet_like.pth")
    m = build_model(tmp_path / "imagenet_like.pth")
    assert torch.equal(m.layer1[0].conv1.weight, plain.layer1[0].conv1.weight)
    assert m.fc.out_features == 1
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        build_model(tmp_path / "missing.pth")


def test_imagenet_weights_offline_fail_with_one_clear_line(tmp_path):
    # Simulate "offline" for real: an empty torch cache and a proxy that refuses connections.
    code = ("from ml.model import build_model\n"
            "try:\n    build_model('imagenet')\nexcept Exception as e:\n"
            "    print('RESULT', type(e).__name__); print('MESSAGE', e)\nelse:\n    print('RESULT downloaded')\n")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    lines = [line for line in out.stdout.splitlines() if line.startswith(("RESULT", "MESSAGE"))]
    assert lines[0] == "RESULT WeightsUnavailableError", out.stdout + out.stderr
    assert "--weights none" in lines[1] and "--weights PATH" in lines[1]
    assert len(lines) == 2  # one line of message


def test_predictor_batches_give_the_same_answer(saved, tmp_path):
    _, path = saved
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)) for i in range(5)]
    p = Predictor.from_checkpoint(path, "cpu")
    one_by_one = [p.predict([im])[0] for im in images]
    batched = p.predict(images, batch_size=2)
    assert [r.probability for r in batched] == pytest.approx([r.probability for r in one_by_one], abs=1e-5)
    assert all(r.label == ("cancer" if r.probability >= 0.3 else "normal") for r in batched)


def test_image_standardised_input_ignores_a_scanner_gain_and_contrast():
    """input_norm "image": the same image at another overall gain and contrast gives the same
    output; the fixed normalisation does not. The weights and their names are unchanged."""
    from ml.model import ImageStandardisedConv2d, build_model, set_input_norm

    torch.manual_seed(0)
    plain = build_model("none", 3, (2,)).eval()
    standardised = build_model("none", 3, (2,), input_norm="image").eval()
    standardised.load_state_dict(plain.state_dict())  # same parameter names
    assert isinstance(standardised.conv1, ImageStandardisedConv2d) and standardised.input_norm == "image"
    x = torch.rand(2, 3, 64, 64)
    brighter = 1.4 * x + 0.3   # more contrast and gain, as another scanner's settings
    with torch.inference_mode():
        assert torch.allclose(standardised(x), standardised(brighter), atol=1e-3)
        assert (plain(x) - plain(brighter)).abs().max() > 1e-2
    set_input_norm(standardised, "fixed")
    with torch.inference_mode():
        assert torch.allclose(standardised(x), plain(x), atol=1e-5)
    with pytest.raises(Exception, match="input normalisation must be one of fixed, image"):
        build_model("none", input_norm="percentile")


def test_input_norm_travels_with_the_checkpoint_and_a_fine_tune(tiny_folder, tmp_path):
    from ml.inference import Predictor
    from ml.model import ImageStandardisedConv2d
    from ml.train import TrainConfig, fit

    out = tmp_path / "m.pt"
    fit(TrainConfig(data=str(tiny_folder), out=str(out), epochs=1, img_size=32, batch_size=8, progress=False,
                    group_duplicates=False, input_norm="image"))
    assert load_checkpoint(out)["meta"]["input_norm"] == "image"
    predictor = Predictor.from_checkpoint(out, "cpu")
    assert isinstance(predictor.model.conv1, ImageStandardisedConv2d)
    # the heatmap paths run through it (Grad-CAM and the deletion test)
    from ml.explain import explain_images
    image = next((tiny_folder / "cancer").glob("*.png"))
    result = explain_images(predictor, [image])[0]
    assert np.isfinite(result.heatmap).all() and result.faithfulness is not None
    assert result.probability == pytest.approx(predictor.predict([image])[0].probability, abs=1e-6)
    # a fine-tune from it sees images as its parent did, unless told otherwise
    tuned = tmp_path / "tuned.pt"
    fit(TrainConfig(data=str(tiny_folder), out=str(tuned), epochs=1, img_size=32, batch_size=8, progress=False,
                    group_duplicates=False, weights=str(out)))
    assert load_checkpoint(tuned)["meta"]["input_norm"] == "image"
