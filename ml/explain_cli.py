"""`python manage.py explain`: heatmaps, overlays and faithfulness for images on disk.

torch is imported inside the command so that `manage.py --help` stays quick.
"""
from __future__ import annotations

from pathlib import Path

import click

METHOD_CHOICES = ("gradcam", "gradcam++", "scorecam")


def _output_stems(images: tuple[str, ...]) -> list[str]:
    """File stems for the outputs, made unique when two inputs share a name."""
    stems, seen = [], {}
    for image in images:
        stem = Path(image).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}-{count + 1}")
    return stems


@click.command("explain")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint (.pt) written by this project.")
@click.option("--method", type=click.Choice(METHOD_CHOICES), default="gradcam", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for <image>_overlay.png and <image>_heatmap.png.")
@click.option("--layer", default=None, help="Target layer name (default: last block of layer4).")
@click.option("--colormap", default="viridis", show_default=True)
@click.option("--opacity", type=click.FloatRange(0, 1), default=0.45, show_default=True)
@click.option("--border-width", type=click.FloatRange(0, 0.5, max_open=True), default=0.1, show_default=True,
              help="Border band width as a fraction of each side.")
@click.option("--faithfulness/--no-faithfulness", default=True, show_default=True,
              help="Run the deletion test (about 4 extra forwards per image).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA if available).")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
def explain(model_path: str, method: str, out_dir: str, layer: str | None, colormap: str,
            opacity: float, border_width: float, faithfulness: bool, device: str | None,
            images: tuple[str, ...]) -> None:
    """Write a heatmap overlay and a grayscale heatmap per IMAGE and print the probability,
    faithfulness (deletion test) and border share of each."""
    from ml import MLError
    from ml.data import load_image
    from ml.explain import explain_images
    from ml.inference import Predictor

    try:
        predictor = Predictor.from_checkpoint(model_path, device)
        pictures = [load_image(path) for path in images]  # fail on an unreadable file before any work
        results = explain_images(predictor, pictures, method, target_layer=layer, colormap=colormap,
                                 opacity=opacity, border_width=border_width, faithfulness=faithfulness)
    except MLError as exc:
        raise click.ClickException(str(exc)) from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for image, stem, result in zip(images, _output_stems(images), results):
        result.overlay.save(out / f"{stem}_overlay.png")
        result.heatmap_image.save(out / f"{stem}_heatmap.png")
        faith = "n/a" if result.faithfulness is None else f"{result.faithfulness:+.3f}"
        warning = "  WARNING: heatmap concentrated in the border" if result.border_warning else ""
        click.echo(f"{image}: probability {result.probability:.3f} ({result.label}), "
                   f"faithfulness {faith}, border share {result.border_share:.2f}{warning}")
    click.echo(f"wrote {2 * len(results)} PNG files to {out}")


COMMANDS = [explain]
