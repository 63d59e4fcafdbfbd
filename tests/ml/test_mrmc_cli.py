"""Bad ratings input (clear errors) and `manage.py mrmc` run through click on the Van Dyke
study (tests/data/mrmc/README.md names the source)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from manage import cli
from ml.mrmc import MRMCError, analyse, read_ratings_csv

VANDYKE = Path(__file__).resolve().parents[1] / "data" / "mrmc" / "vandyke.csv"
HEADER = "reader,modality,case,truth,rating\n"


def crossed(readers=("r1", "r2"), modalities=("A", "B"), truths=(1, 1, 0, 0)):
    return [(r, m, f"c{k}", t, (k * 7 + len(r) + len(m)) % 5 + 1)
            for r in readers for m in modalities for k, t in enumerate(truths)]


@pytest.mark.parametrize("rows, message", [
    ([], "no ratings"),
    (crossed(modalities=("A",)), "at least 2 modalities"),
    (crossed(readers=("r1",)), "at least 2 readers"),
    (crossed(truths=(1, 1, 1, 1)), "found 4 with disease and 0 without"),
    (crossed(truths=(0, 0, 0)), "found 0 with disease and 3 without"),
    (crossed()[:-1], "not fully crossed: reader r2 has no rating of case c3 in modality B"),
    (crossed() + [("r1", "A", "c0", 1, 3)], "reader r1 rated case c0 twice in modality A"),
    (crossed() + [("r1", "C", "c0", 0, 3)], "case c0 has two truths"),
    ([("r1", "A", "c0", 2, 3)], "row 1: truth must be 0 (no disease) or 1 (disease), not 2"),
    ([("r1", "A", "c0", 1, "high")], "row 1: rating must be a number, not 'high'"),
    ([("r1", "A", "c0", 1, float("inf"))], "rating must be a finite number"),
    ([("r1", "A", "", 1, 3)], "row 1: case is empty"),
    ([("r1", "A", "c0", 1)], "expected 5 values"),
    ([{"reader": "r1", "modality": "A", "case": "c0", "rating": 3}], "row 1: missing truth"),
])
def test_design_errors_are_named(rows, message):
    with pytest.raises(MRMCError) as info:
        analyse(rows)
    assert message in str(info.value)


def test_a_reader_missing_a_whole_modality_is_not_crossed():
    rows = [r for r in crossed(readers=("r1", "r2", "r3")) if not (r[0] == "r3" and r[1] == "B")]
    with pytest.raises(MRMCError, match="reader r3 has no rating of case c0 in modality B"):
        analyse(rows)


def test_modality_order_must_name_the_modalities():
    with pytest.raises(MRMCError, match="does not name exactly the modalities"):
        analyse(crossed(), modalities=["A", "C"])
    assert [p["a"] for p in analyse(crossed(), modalities=["B", "A"])["pairs"]] == ["B"]


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("reader,modality,case,rating\nr1,A,c0,3\n", "missing column(s) truth"),
    (HEADER, "no ratings below the header"),
    (HEADER + "r1,A,c0,1,3\nr1,A,c1,yes,3\n", "line 3: truth must be 0"),
    (HEADER + "r1,A,c0\n", "line 2: 3 fields"),
])
def test_csv_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "ratings.csv"
    path.write_text(text)
    with pytest.raises(MRMCError) as info:
        read_ratings_csv(path)
    assert message in str(info.value)


def test_csv_header_in_another_order_with_extra_columns(tmp_path):
    path = tmp_path / "ratings.csv"
    lines = [" Rating ,Truth,CASE,Modality,Reader,note"] + [f"{x},{t},{c},{m},{r},-" for r, m, c, t, x in crossed()]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8-sig")
    assert read_ratings_csv(path) == [(r, m, c, t, float(x)) for r, m, c, t, x in crossed()]


def test_cli_reports_the_van_dyke_analysis_and_writes_json(tmp_path):
    out = tmp_path / "vd.json"
    result = CliRunner().invoke(cli, ["mrmc", str(VANDYKE), "--json", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "2 modalities, 5 readers, 114 cases (45 with disease, 69 without)" in text
    assert "0.89704" in text and "0.94084" in text  # mean areas
    assert "F(1, 15.26) = 4.456, p = 0.0517" in text
    assert "(-0.08796, 0.00036)" in text  # the RRRC interval of the difference
    assert "chi-square(1) = 5.476, p = 0.0193" in text and "(-0.08049, -0.00711)" in text
    assert "F(1, 4) = 8.704, p = 0.0420" in text
    assert f"wrote {out}" in text
    data = json.loads(out.read_text())
    for key in ("auc", "rrrc", "frrc", "rrfc", "pairs"):
        assert key in data
    assert set(data["rrrc"]) >= {"f", "ddf", "p"} and set(data["frrc"]) >= {"chi2", "df", "p"}
    assert set(data["rrfc"]) >= {"f", "ddf", "p"}
    assert set(data["pairs"][0]) >= {"a", "b", "diff", "se", "ci_low", "ci_high", "p"}
    assert round(data["auc"]["1"], 8) == 0.94083736 and round(data["rrrc"]["ddf"], 5) == 15.25967


def test_cli_json_to_standard_output():
    result = CliRunner().invoke(cli, ["mrmc", str(VANDYKE), "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert round(data["frrc"]["chi2"], 5) == 5.47595


@pytest.mark.parametrize("text, message", [
    ("reader,modality,case,truth,rating\nr1,A,c0,1,3\n", "at least 2 modalities"),
    ("hello\n", "missing column(s) reader, modality, case, truth, rating"),
])
def test_cli_bad_file_exits_2_with_the_reason(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["mrmc", str(path)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_cli_missing_and_binary_files(tmp_path):
    result = CliRunner().invoke(cli, ["mrmc", str(tmp_path / "absent.csv")])
    assert result.exit_code == 2 and "does not exist" in result.output
    binary = tmp_path / "ratings.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    result = CliRunner().invoke(cli, ["mrmc", str(binary)])
    assert result.exit_code == 2 and "not a UTF-8 text CSV file" in result.output


def test_cli_three_modalities_lists_every_pair(tmp_path):
    from tests.ml.test_mrmc import synthetic_rows

    path = tmp_path / "three.csv"
    rows = synthetic_rows(modalities=("unaided", "aided by the model", "double reading"))
    path.write_text(HEADER + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    result = CliRunner().invoke(cli, ["mrmc", str(path)])
    assert result.exit_code == 0, result.output
    assert "3 modalities, 4 readers, 40 cases (16 with disease, 24 without)" in result.output
    assert "F(2, " in result.output and "chi-square(2) = " in result.output and "F(2, 6) = " in result.output
    for pair in ("unaided - aided by the model", "unaided - double reading", "aided by the model - double reading"):
        assert result.output.count(pair) == 3 + 4  # three analyses, and each reader alone
