"""`python manage.py mrmc RATINGS.csv [--json OUT.json]`: the multi-reader multi-case ROC
analysis (Obuchowski-Rockette, jackknife covariances, Hillis degrees of freedom) of a ratings
file; docs/reader-studies.md. numpy and scipy only: no torch, no database.
"""
from __future__ import annotations

import json
from pathlib import Path

import click


class BadRatings(click.ClickException):
    """A ratings file that cannot be analysed: exit status 2, like a usage error."""

    exit_code = 2


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p(value) -> str:
    return "n/a" if value is None else ("<0.0001" if value < 0.0001 else f"{value:.4f}")


def _ci(row: dict, digits: int = 5) -> str:
    return f"({_num(row['ci_low'], digits)}, {_num(row['ci_high'], digits)})"


def _pair_table(rows: list[dict], stat: str, with_df: bool) -> list[str]:
    names = [(f"reader {row['reader']}: " if "reader" in row else "") + f"{row['a']} - {row['b']}" for row in rows]
    width = max([24, *(len(n) for n in names)])
    lines = [f"  {'comparison':<{width}} {'difference':>11} {'std err':>9} " + (f"{'df':>7} " if with_df else "")
             + f"{stat:>7} {'p':>8}  95 % CI"]
    for name, row in zip(names, rows):
        df = f"{_num(row.get('df'), 2):>7} " if with_df else ""
        lines.append(f"  {name:<{width}} {_num(row['diff'], 5):>11} {_num(row['se'], 5):>9} {df}"
                     f"{_num(row.get(stat), 2):>7} {_p(row['p']):>8}  {_ci(row)}")
    return lines


def format_report(result: dict) -> str:
    """The analysis as text: areas, then each of the three analyses with its pair differences."""
    mods, readers = result["modalities"], result["readers"]
    name_w = max(12, *(len(r) + 2 for r in readers))
    col_w = max(12, *(len(m) + 2 for m in mods))
    lines = [f"MRMC ROC analysis: {len(mods)} modalities, {len(readers)} readers, {result['n_cases']} cases "
             f"({result['n_positive']} with disease, {result['n_negative']} without)",
             "Obuchowski-Rockette model, jackknife covariances over cases, Hillis denominator degrees of freedom;",
             "empirical (trapezoidal) ROC area, ties counting one half.", "",
             "ROC areas (reader × modality)",
             "  " + f"{'reader':<{name_w}}" + "".join(f"{m:>{col_w}}" for m in mods)]
    for reader in readers:
        lines.append(f"  {reader:<{name_w}}"
                     + "".join(f"{result['reader_auc'][m][reader]:>{col_w}.5f}" for m in mods))
    lines.append(f"  {'mean':<{name_w}}" + "".join(f"{result['auc'][m]:>{col_w}.5f}" for m in mods))
    components = ", ".join(f"{label} {_num(result[key], 8)}" for label, key in (
        ("Var(error)", "var_error"), ("Cov1", "cov1"), ("Cov2", "cov2"), ("Cov3", "cov3"), ("MS(T)", "ms_t"),
        ("MS(R)", "ms_r"), ("MS(T×R)", "ms_tr")))
    lines += ["", f"Variance components: {components}"]

    r = result["rrrc"]
    lines += ["", "1. Random readers and random cases (results apply to both populations)",
              f"  F({r['ndf']}, {_num(r['ddf'], 2)}) = {_num(r['f'], 3)}, p = {_p(r['p'])}"
              f"   [error term MS(T×R) + r·max(Cov2 - Cov3, 0) = {_num(r['error_term'], 8)}]"]
    lines += _pair_table(result["pairs"], "t", True)
    lines.append("  single modalities:")
    for m, row in r["modalities"].items():
        lines.append(f"    {m:<22} AUC {row['auc']:.5f}  std err {_num(row['se'], 5)}  "
                     f"df {_num(row['df'], 2)}  95 % CI {_ci(row)}")

    f = result["frrc"]
    lines += ["", "2. Fixed readers and random cases (results apply to these readers only)",
              f"  chi-square({f['df']}) = {_num(f['chi2'], 3)}, p = {_p(f['p'])}"]
    lines += _pair_table(result["frrc_pairs"], "z", False)
    lines.append("  each reader alone:")
    lines += _pair_table(result["frrc_reader_pairs"], "z", False)[1:]

    x = result["rrfc"]
    lines += ["", "3. Random readers and fixed cases (results apply to these cases only)",
              f"  F({x['ndf']}, {x['ddf']}) = {_num(x['f'], 3)}, p = {_p(x['p'])}"]
    lines += _pair_table(result["rrfc_pairs"], "t", True)
    return "\n".join(lines)


@click.command("mrmc")
@click.argument("ratings", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "json_out", metavar="OUT.json", default=None,
              help="Also write the full result as JSON to OUT.json ('-' writes it to standard output "
                   "instead of the report).")
def mrmc(ratings: str, json_out: str | None) -> None:
    """Multi-reader multi-case ROC analysis of RATINGS (a CSV with columns reader, modality,
    case, truth, rating; every reader rates every case in every modality, two modalities or
    more): per reader and mean ROC areas, and the Obuchowski-Rockette analyses for random
    readers and cases, fixed readers, and fixed cases, with 95 % intervals for every pair."""
    from ml.mrmc import MRMCError, analyse, read_ratings_csv

    try:
        result = analyse(read_ratings_csv(ratings))
    except MRMCError as exc:
        raise BadRatings(str(exc)) from exc
    text = json.dumps(result, indent=2)
    if json_out == "-":
        click.echo(text)
        return
    click.echo(format_report(result))
    if json_out:
        try:
            Path(json_out).write_text(text + "\n")
        except OSError as exc:
            raise BadRatings(f"cannot write {json_out}: {exc.strerror or exc}") from exc
        click.echo(f"\nwrote {json_out}")


COMMANDS = [mrmc]
