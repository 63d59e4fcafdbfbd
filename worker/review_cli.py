"""`manage.py export-feedback`, `manage.py retrain` and `manage.py models list|show|promote|rollback`:
parse, then delegate to worker.feedback and worker.retrain.

The `models` subcommands join the group that worker.cli defines (next to `register`).
"""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from datetime import datetime

import click

from worker.cli import models


@contextmanager
def _app_context():
    from webapp import create_app

    app = create_app()
    with app.app_context():
        yield app


def _date(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM)", param_hint="--since") from None


@click.command("export-feedback")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="ImageFolder to write (re-running into it is safe)")
@click.option("--since", help="only cases reviewed on or after this date (YYYY-MM-DD, UTC)")
@click.option("--min-reviews", default=1, show_default=True, type=click.IntRange(1), help="leave out cases with fewer reviews")
@click.option("--consensus", "rule", default="majority", show_default=True, type=click.Choice(["majority", "unanimous"]))
def export_feedback_command(out_dir: str, since: str | None, min_reviews: int, rule: str) -> None:
    """Write reviewed cases as malignant/, benign/ and normal/ folders plus manifest.csv."""
    from ml import MLError
    from worker.feedback import describe, export_feedback

    since_at = _date(since)
    with _app_context():
        try:
            export = export_feedback(out_dir, since_at, min_reviews, rule)
        except MLError as exc:
            raise click.ClickException(str(exc)) from None
    for line in describe(export):
        click.echo(line)
    click.echo(f"wrote {out_dir}")


@click.command()
@click.option("--base-data", required=True, type=click.Path(exists=True, file_okay=False), help="ImageFolder of the original training data")
@click.option("--locked-test", required=True, type=click.Path(exists=True, file_okay=False), help="ImageFolder never trained on; both models are compared on it")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--init", default="active", show_default=True, type=click.Choice(["active", "imagenet", "none"]), help="starting weights")
@click.option("--arch", type=click.Choice(["resnet18", "efficientnet_lite0"]), default=None,
              help="network for --init imagenet / none (default resnet18); --init active keeps the active model's")
@click.option("--promote", default="auto", show_default=True, type=click.Choice(["auto", "never", "force"]))
@click.option("--img-size", type=click.IntRange(16, 4096), help="input size (default: the active model's)")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(2))
@click.option("--min-reviews", default=1, show_default=True, type=click.IntRange(1))
@click.option("--consensus", "rule", default="majority", show_default=True, type=click.Choice(["majority", "unanimous"]))
@click.option("--target-sensitivity", type=click.FloatRange(0, 1), help="gate for --promote auto (default RETRAIN_TARGET_SENSITIVITY, 0.90)")
@click.option("--min-specificity", type=click.FloatRange(0, 1),
              help="gate for --promote auto: specificity floor at the new threshold on the locked test set, unless "
                   "not lower than the active model's (default RETRAIN_MIN_SPECIFICITY, 0.25; 0: off)")
@click.option("--work-dir", type=click.Path(file_okay=False), help="keep the export, merged data and report here (default: a temporary folder)")
@click.option("--name", help="name of the new version (default v1, v2, ...)")
@click.option("--feedback-weight", default=1, show_default=True, type=click.IntRange(1, 50),
              help="each reviewed image counts this many times in training (a site's few cases against a large base set)")
@click.option("--group-pattern", help="regular expression on the base data's file names whose first group (or whole "
              "match) names the patient, e.g. '^([A-Z]{4})_'; reviewed DICOM cases are grouped by their patient key "
              "without it. One patient's images stay on one side of the validation split")
def retrain(base_data, locked_test, epochs, init, arch, promote, img_size, batch_size, min_reviews, rule,
            target_sensitivity, min_specificity, work_dir, name, feedback_weight, group_pattern) -> None:
    """Export feedback, merge with base data, train, compare on the locked test set, register, gate."""
    from ml import MLError
    from worker.retrain import RetrainError, comparison_table
    from worker.retrain import retrain as run_retrain

    with _app_context(), tempfile.TemporaryDirectory(prefix="retrain-") as scratch:
        try:
            outcome = run_retrain(base_data, locked_test, work_dir or scratch, epochs=epochs, init=init, arch=arch,
                                  promote=promote, img_size=img_size, batch_size=batch_size,
                                  min_reviews=min_reviews, consensus_rule=rule,
                                  target_sensitivity=target_sensitivity, name=name,
                                  feedback_weight=feedback_weight, group_pattern=group_pattern,
                                  min_specificity=min_specificity)
        except (RetrainError, MLError) as exc:
            raise click.ClickException(f"retraining stopped: {exc}") from None
        m = outcome.merge
        click.echo(f"training data: {m.n_base} base + {m.n_feedback} reviewed image(s); {m.duplicates_removed} "
                   f"duplicate(s) removed, {m.relabelled_by_feedback} relabelled by reviewers, "
                   f"{m.left_out_locked_test} left out as locked-test images")
        if m.n_grouped:
            click.echo(f"patients known for {m.n_grouped} image(s) ({m.n_patients} patient(s)): each kept on one "
                       f"side of the validation split")
        click.echo(f"registered {outcome.version.name} (parent {outcome.previous.name if outcome.previous else 'none'}, "
                   f"data {outcome.version.data_fingerprint[:12]})")
        for line in comparison_table(outcome):
            click.echo(line)


def threshold_rule_lines(adaptation: dict, target: float) -> list[str]:
    """What the site threshold promises for the site's next cancers, and a warning where the
    reviewed cancers are too few for the confidence asked."""
    reached, wanted = adaptation["confidence_reached"], adaptation.get("confidence")
    missed = adaptation["after"]["confusion"]["fn"]
    lines = [f"threshold keeps sensitivity >= {target:.2f} on the site's next cancers with probability "
             f"{reached:.0%}" + (f" (asked: {wanted:.0%})" if wanted else " (in-sample rule)")
             + f"; {missed} of {adaptation['n_malignant']} reviewed cancers fall below it"]
    options = adaptation.get("options") or []
    if options:
        lines.append("on these cases, by rule (threshold, sensitivity, specificity, chance of keeping the target):")
        for row in options:
            name = "in-sample" if row["confidence"] is None else f"confidence {row['confidence']:.0%}"
            lines.append(f"  {name:16} {row['threshold']:.3f}  {row['sensitivity']:.3f}  {row['specificity']:.3f}  "
                         f"{row['confidence_reached']:.0%}")
    if wanted and reached < wanted:
        lines.append(f"warning: {adaptation['n_malignant']} reviewed cancers are too few for {wanted:.0%}: the threshold "
                     f"lies below all of them; about {adaptation['malignant_needed']} are needed")
    return lines


@click.command()
@click.option("--locked-test", required=True, type=click.Path(exists=True, file_okay=False),
              help="ImageFolder of this site never used for adaptation; the gate compares both versions on it")
@click.option("--promote", default="auto", show_default=True, type=click.Choice(["auto", "never", "force"]))
@click.option("--target-sensitivity", type=click.FloatRange(0, 1), help="sensitivity the new threshold is set for (default RETRAIN_TARGET_SENSITIVITY, 0.90)")
@click.option("--min-specificity", type=click.FloatRange(0, 1),
              help="gate for --promote auto: specificity floor at the new threshold on the locked test set, unless "
                   "not lower than the active model's (default RETRAIN_MIN_SPECIFICITY, 0.25; 0: off)")
@click.option("--min-reviews", default=1, show_default=True, type=click.IntRange(1))
@click.option("--consensus", "rule", default="majority", show_default=True, type=click.Choice(["majority", "unanimous"]))
@click.option("--confidence", type=click.FloatRange(0, 1, max_open=True),
              help="how sure the threshold must be to keep the target sensitivity on the site's next cases "
                   "(default 0.8, ml.adapt.SITE_THRESHOLD_CONFIDENCE); 0: met on the reviewed cases only")
@click.option("--prevalence", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="instead of the reviewed cases: the share of this site's cases that are malignant (e.g. 0.13 from "
                   "its records); the probabilities are moved to it and the threshold with them, so every verdict stays")
@click.option("--adapt-bn", is_flag=True,
              help="first re-estimate the network's batch-normalisation statistics on this site's uploads (reviewed "
                   "or not; at least 50 it was not trained on): no labels, no training, but the ranking changes, so "
                   "the gate's ROC-AUC test on --locked-test decides (docs/model-quality.md)")
@click.option("--adapt-bn-weight", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="with --adapt-bn: weight of the site's statistics against the training ones")
@click.option("--site", help="name of the site, recorded with the version")
@click.option("--work-dir", type=click.Path(file_okay=False), help="keep the export and the checkpoint here")
@click.option("--name", help="name of the new version (default v1, v2, ...)")
def recalibrate(locked_test, promote, target_sensitivity, min_specificity, min_reviews, rule, confidence, prevalence,
                adapt_bn, adapt_bn_weight, site, work_dir, name) -> None:
    """Adapt the active model to this site from its reviewed cases (new calibration and threshold) or to its
    stated share of cancers (--prevalence: new probabilities, the same verdicts); the weights stay."""
    from ml import MLError
    from worker.retrain import RetrainError, recalibrate_active

    if prevalence is not None and (confidence is not None or target_sensitivity is not None or adapt_bn):
        raise click.UsageError("--prevalence keeps the threshold's verdicts; --confidence, --target-sensitivity and "
                               "--adapt-bn set a new threshold from reviewed cases: give one or the other")
    with _app_context(), tempfile.TemporaryDirectory(prefix="recalibrate-") as scratch:
        try:
            o = recalibrate_active(locked_test, work_dir or scratch, promote=promote, target_sensitivity=target_sensitivity,
                                   min_reviews=min_reviews, consensus_rule=rule, site=site, name=name,
                                   confidence=confidence, min_specificity=min_specificity, prevalence=prevalence,
                                   adapt_bn=adapt_bn, adapt_bn_weight=adapt_bn_weight)
        except (RetrainError, MLError) as exc:
            raise click.ClickException(f"recalibration stopped: {exc}") from None
        a = o.site_adaptation
        if a.get("method") == "prevalence":
            click.echo(f"probabilities moved from the share of cancers they were fitted on ({a['prevalence_before']:.1%}) "
                       f"to the stated {a['prevalence']:.1%} (log-odds {a['log_odds_shift']:+.3f}); threshold "
                       f"{a['previous_threshold']:.3f} -> {o.version.threshold:.3f}: every case keeps its verdict")
        else:
            _echo_site_fit(a, o.version.threshold, o.version.meta["target_sensitivity"])
        click.echo(f"registered {o.version.name} (parent {o.previous.name})")
        for key in ("roc_auc", "sensitivity", "specificity", "ece", "threshold"):
            old, new = o.active_metrics.get(key), o.candidate_metrics.get(key)
            click.echo(f"locked test {key:12} {_fmt(old):>8} -> {_fmt(new):>8}")
        verdict = "PROMOTED: now the active model" if o.decision.promote else "NOT PROMOTED"
        click.echo(f"decision: {verdict} ({'; '.join(o.decision.reasons)})")


def _echo_site_fit(a: dict, threshold: float, target: float) -> None:
    """What a fit on the site's reviewed cases did to them, and the threshold rules side by side."""
    bn = a.get("batchnorm")
    if bn:
        seen = f" ({bn['left_out_seen']} of its own training images left out)" if bn["left_out_seen"] else ""
        click.echo(f"batch-normalisation statistics re-estimated on {bn['images']} of this site's images{seen}, weight "
                   f"{bn['weight']:g}; ROC-AUC on the reviewed cases {bn['roc_auc_before']:.3f} -> "
                   f"{bn['roc_auc_after']:.3f} (their labels were not used for it)")
    click.echo(f"fitted on {a['n']} reviewed case(s) ({a['n_malignant']} malignant): threshold "
               f"{a['previous_threshold']:.3f} -> {threshold:.3f}; on those cases ECE "
               f"{a['before']['ece']:.3f} -> {a['after']['ece']:.3f}, sensitivity {a['before']['sensitivity']:.3f} -> "
               f"{a['after']['sensitivity']:.3f}, specificity {a['before']['specificity']:.3f} -> "
               f"{a['after']['specificity']:.3f}")
    if a.get("left_out_seen"):
        click.echo(f"left out {a['left_out_seen']} reviewed case(s) the model was trained or validated on "
                   f"(its scores there are optimistic)")
    for line in threshold_rule_lines(a, target):
        click.echo(line)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


@models.command("list")
def models_list() -> None:
    """List model versions: active mark, parent, threshold, validation and locked-test ROC-AUC."""
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import ModelVersion

    with _app_context():
        versions = db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        if not versions:
            click.echo("no model versions; register one with 'manage.py models register PATH'")
        for v in versions:
            locked = (v.meta or {}).get("locked_test") or {}
            click.echo(f"{'*' if v.is_active else ' '} {v.name:12} parent {v.parent.name if v.parent else '-':10} "
                       f"threshold {v.threshold:.3f}  val roc_auc {_fmt(v.metrics.get('roc_auc'))}  "
                       f"locked-test roc_auc {_fmt(locked.get('roc_auc'))}  {v.created_at:%Y-%m-%d %H:%M}")


@models.command("show")
@click.argument("version")
def models_show(version: str) -> None:
    """Everything recorded about one version (name or id)."""
    from webapp.registry import find_version

    with _app_context():
        v = find_version(version)
        if v is None:
            raise click.ClickException(f"no model version {version!r}; see 'manage.py models list'")
        click.echo(json.dumps({
            "name": v.name, "active": v.is_active, "parent": v.parent.name if v.parent else None,
            "threshold": v.threshold, "input_size": v.input_size, "checksum": v.checksum,
            "data_fingerprint": v.data_fingerprint, "created_at": v.created_at.isoformat(timespec="seconds"),
            "validation_metrics": v.metrics, "notes": v.notes,
            **{k: v.meta.get(k) for k in ("locked_test", "compared_with", "training_data", "promotion") if v.meta.get(k)},
        }, indent=2, default=str))


@models.command("promote")
@click.argument("version")
@click.option("--force", is_flag=True, help="promote a version that the promotion gate refused (the reasons are audited)")
def models_promote(version: str, force: bool) -> None:
    """Make VERSION the active model; workers use it from their next case."""
    from webapp.registry import RegistryError, gate_refusal, promote

    with _app_context():
        try:
            v = promote(version, force=force)
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None
        refused = gate_refusal(v)
        if refused:
            click.echo(f"warning: the promotion gate did not promote {v.name}: {'; '.join(refused)}", err=True)
        click.echo(f"{v.name} is now the active model")


@models.command("rollback")
def models_rollback() -> None:
    """Make the previously active version active again."""
    from webapp.registry import RegistryError, rollback

    with _app_context():
        try:
            v = rollback()
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"rolled back: {v.name} is the active model again")


COMMANDS = [export_feedback_command, retrain, recalibrate]
