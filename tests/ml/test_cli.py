"""manage.py train / evaluate / predict through click, as an operator runs them."""
import json

import pytest
from click.testing import CliRunner

from manage import cli
from tests.ml.conftest import make_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_folder(root / "data", n_per_class=10)
    model = root / "model.pt"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(model), "--epochs", "1",
                                      "--img-size", "32", "--batch-size", "8", "--no-group-duplicates", "--quiet"])
    assert result.exit_code == 0, result.output
    return data, model, result.output


def test_train_prints_the_validation_figures(trained):
    _, model, output = trained
    assert model.exists()
    assert "val roc_auc" in output and "sensitivity" in output and f"wrote {model}" in output


def test_evaluate_writes_json_and_report(trained, tmp_path):
    data, model, _ = trained
    out_json, report = tmp_path / "m.json", tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(model), "--data", str(data),
                                      "--json", str(out_json), "--report", str(report), "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out_json.read_text())
    for key in ("roc_auc", "roc_auc_ci", "accuracy", "sensitivity", "specificity", "precision", "f1",
                "threshold", "n", "n_positive"):
        assert key in metrics
    assert metrics["n"] == 20 and metrics["n_positive"] == 10
    c = metrics["confusion"]
    assert c["tp"] + c["fn"] == 10 and c["tn"] + c["fp"] == 10
    assert metrics["sensitivity"] == pytest.approx(c["tp"] / 10)
    assert {p.name for p in report.iterdir()} == {"roc.png", "pr.png", "confusion.png", "calibration.png", "metrics.json"}


def test_predict_one_line_per_image_and_bad_files_reported(trained, tmp_path):
    data, model, _ = trained
    good = sorted((data / "cancer").glob("*.png"))[:2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = CliRunner().invoke(cli, ["predict", "--model", str(model), *map(str, good), str(bad)])
    assert result.exit_code == 1
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2
    for line, path in zip(lines, good):
        name, prob, label, _ = line.split("\t")
        assert name == str(path) and 0.0 <= float(prob) <= 1.0 and label in ("cancer", "normal")
    assert "bad.png" in result.stderr


def test_clear_errors_for_bad_model_and_bad_data(trained, tmp_path):
    data, model, _ = trained
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(model.read_bytes()[:1000])
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(corrupt), "--data", str(data)])
    assert result.exit_code == 1 and "truncated" in result.output and "Traceback" not in result.output
    one_class = make_folder(tmp_path / "one", n_per_class=3, classes=("normal",))
    result = CliRunner().invoke(cli, ["train", "--data", str(one_class), "--out", str(tmp_path / "x.pt"), "--quiet"])
    assert result.exit_code == 1 and "only one class" in result.output


def test_train_refuses_a_broken_group_pattern_by_name(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=3)
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "m.pt"),
                                      "--group-pattern", "([A-Z", "--quiet"])
    assert result.exit_code == 1 and "group pattern '([A-Z' is not a regular expression" in result.output
    assert not (tmp_path / "m.pt").exists()


def test_train_snapshot_epochs_and_threshold_confidence_reach_the_checkpoints(tmp_path):
    from ml.checkpoint import load_checkpoint

    data = make_folder(tmp_path / "data", n_per_class=6)
    model = tmp_path / "m.pt"
    args = ["train", "--data", str(data), "--out", str(model), "--epochs", "2", "--img-size", "32", "--batch-size", "4",
            "--no-group-duplicates", "--quiet"]
    result = CliRunner().invoke(cli, args + ["--snapshot-epochs", "1,2", "--threshold-confidence", "0.5",
                                             "--input-norm", "image"])
    assert result.exit_code == 0, result.output
    assert [load_checkpoint(tmp_path / f"m.e{e}.pt")["meta"]["epoch"] for e in (1, 2)] == [1, 2]
    assert load_checkpoint(model)["meta"]["threshold_confidence"] == 0.5
    assert load_checkpoint(model)["meta"]["input_norm"] == "image"
    bad = CliRunner().invoke(cli, args + ["--snapshot-epochs", "forty"])
    assert bad.exit_code == 2 and "comma-separated list of epoch numbers" in bad.output


def test_train_resize_letterbox_reaches_the_checkpoint_and_evaluate_follows_it(tmp_path):
    from ml.checkpoint import load_checkpoint

    data = make_folder(tmp_path / "data", n_per_class=6)
    model = tmp_path / "boxed.pt"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(model), "--epochs", "1", "--img-size", "32",
                                      "--batch-size", "4", "--no-group-duplicates", "--resize", "letterbox", "--mixstyle", "0.5",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(model)["meta"]
    assert meta["resize"] == "letterbox-bilinear" and meta["args"]["mixstyle"] == 0.5
    # the leakage guard hashes evaluated images the way the checkpoint saw them (letterboxed):
    # copies with one pixel changed are not the same files but are found as near copies
    import numpy as np
    from PIL import Image

    copies = tmp_path / "copies"
    for path in data.rglob("*.png"):
        pixels = np.asarray(Image.open(path)).copy()
        pixels[0, 0] = 255 - pixels[0, 0]
        (copies / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(copies / path.parent.name / path.name)
    out = tmp_path / "m.json"
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(model), "--data", str(copies), "--json", str(out),
                                      "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["overlap_exact"], report["overlap_near"]) == (0, 12)
    bad = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--resize", "crop"])
    assert bad.exit_code == 2 and "crop" in bad.output
    bad = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--mixstyle", "2"])
    assert bad.exit_code == 2 and "--mixstyle" in bad.output
    bad = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--randconv", "1.5"])
    assert bad.exit_code == 2 and "--randconv" in bad.output


def test_ensemble_combines_members_trained_with_one_split_seed(trained, tmp_path):
    data, first, _ = trained
    second = tmp_path / "second.pt"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(second), "--epochs", "1",
                                      "--img-size", "32", "--batch-size", "8", "--no-group-duplicates", "--quiet",
                                      "--seed", "3", "--split-seed", "0"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "ensemble.pt"
    result = CliRunner().invoke(cli, ["ensemble", "--data", str(data), "--out", str(out), str(first), str(second)])
    assert result.exit_code == 0, result.output
    assert "member model.pt (seed 0" in result.output and "member second.pt (seed 3" in result.output
    assert "ensemble of 2: val roc_auc" in result.output and out.exists()
    images = sorted(str(p) for p in data.rglob("*.png"))[:2]
    predicted = CliRunner().invoke(cli, ["predict", "--model", str(out), *images])
    assert predicted.exit_code == 0 and len(predicted.output.strip().splitlines()) == 2


def test_ensemble_of_members_with_their_own_splits_is_refused_in_one_line(trained, tmp_path):
    data, first, _ = trained
    other = tmp_path / "other.pt"
    CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(other), "--epochs", "1", "--img-size", "32",
                             "--batch-size", "8", "--no-group-duplicates", "--quiet", "--seed", "3"])
    result = CliRunner().invoke(cli, ["ensemble", "--data", str(data), "--out", str(tmp_path / "e.pt"),
                                      str(first), str(other)])
    assert result.exit_code == 1 and "same --split-seed" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e.pt").exists()
