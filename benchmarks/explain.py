#!/usr/bin/env python
"""Cost of explanations against prediction alone: `python benchmarks/explain.py`.

ResNet18 (random weights unless --model: timing does not depend on them), 224 px, float32, channels_last.
Prints ms per image for prediction alone (torch.inference_mode), prediction + Grad-CAM and
+ Grad-CAM++ at layer4 (4 x 4 grid at 128 px), layer3 (8 x 8), layer2 (16 x 16, Grad-CAM) and the
layer3+layer4 fusion, at
batch 1 and 8, each as a ratio to prediction alone measured in the same run; then exact
Score-CAM against the time of the masked forwards it cannot avoid (one per channel: 512 at
layer4, run as plain predictions in batches of --scorecam-batch). Where pytorch-grad-cam is
installed (`pip install -r requirements-bench.txt`) its ScoreCAM runs on the same model and
image and the correlation of the maps is printed; otherwise that comparison is skipped.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ml.explain import explain  # noqa: E402
from ml.model import build_model  # noqa: E402


def synthetic_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 16, size // 16, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear") + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return x.contiguous(memory_format=torch.channels_last)


def correlation(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats for the fast methods")
    parser.add_argument("--scorecam-batch", type=int, default=32, help="masked images per forward")
    parser.add_argument("--no-scorecam-batch8", dest="scorecam_batch8", action="store_false",
                        help="skip Score-CAM at batch 8 (8 x 512 masked forwards: most of the run)")
    parser.add_argument("--no-scorecam", dest="scorecam", action="store_false", help="skip Score-CAM")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=None,
                        help="a trained checkpoint: timings are the same, map correlations become meaningful")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        from ml.checkpoint import load_model
        model = load_model(args.model)[0].to(memory_format=torch.channels_last)
    else:
        model = build_model("none").eval().to(memory_format=torch.channels_last)
    weights = args.model or "random weights"
    print(f"ResNet18 ({weights}), {args.size} px, float32, channels_last, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ms per image (median), ratio to prediction alone")

    rows: list[tuple[str, int, float]] = []
    for batch in (1, 8):
        x = synthetic_batch(batch, args.size, seed=batch)

        def predict() -> None:
            with torch.inference_mode():
                torch.sigmoid(model(x).flatten())

        cases = {"prediction alone": predict,
                 "prediction + Grad-CAM": lambda: explain(model, x, "gradcam"),
                 "prediction + Grad-CAM++": lambda: explain(model, x, "gradcam++"),
                 "+ Grad-CAM layer2": lambda: explain(model, x, "gradcam", "layer2"),
                 "+ Grad-CAM layer3": lambda: explain(model, x, "gradcam", "layer3"),
                 "+ Grad-CAM++ layer3": lambda: explain(model, x, "gradcam++", "layer3"),
                 "+ Grad-CAM layer3+layer4": lambda: explain(model, x, "gradcam", "layer3+layer4")}
        for _, fn in cases.items():
            fn()  # warm-up: oneDNN primitives for this shape
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):  # round-robin, so load from other users hits all alike
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3 / batch)
        rows.extend((name, batch, statistics.median(v)) for name, v in times.items())

    base = {b: ms for name, b, ms in rows if name == "prediction alone"}
    for name, batch, ms in rows:
        print(f"  {name:<32} batch {batch}: {ms:9.1f} ms/img  {ms / base[batch]:6.2f}x")

    if not args.scorecam:
        return
    # Score-CAM: one timed run each; its floor is one masked forward per channel (512 at
    # layer4), timed here as plain predictions of that many images in the same batches
    x1 = synthetic_batch(1, args.size, seed=1)
    forwards = x1.repeat(args.scorecam_batch, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    channels = model.fc.in_features

    def masked_forwards() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(-(-channels // args.scorecam_batch)):
                torch.sigmoid(model(forwards).flatten())
        return (time.perf_counter() - t) * 1e3

    floor_before = masked_forwards()
    t = time.perf_counter()
    _, exact = explain(model, x1, "scorecam", scorecam_batch_size=args.scorecam_batch)
    exact_ms = (time.perf_counter() - t) * 1e3
    floor_ms = min(floor_before, masked_forwards())  # either side of it: load hits both
    print(f"  {'Score-CAM exact':<32} batch 1: {exact_ms:9.1f} ms/img  {exact_ms / base[1]:6.2f}x")
    print(f"  {f'{channels} plain forwards':<32} batch {args.scorecam_batch}: {floor_ms:8.1f} ms      "
          f"Score-CAM / {channels} forwards = {exact_ms / floor_ms:.2f}x (target <= 1.1x)")
    if args.scorecam_batch8:
        x8 = synthetic_batch(8, args.size, seed=8)
        t = time.perf_counter()
        explain(model, x8, "scorecam", scorecam_batch_size=args.scorecam_batch)
        ms8 = (time.perf_counter() - t) * 1e3 / 8
        print(f"  {'Score-CAM exact':<32} batch 8: {ms8:9.1f} ms/img  {ms8 / base[8]:6.2f}x"
              f"  ({ms8 / floor_ms:.2f}x {channels} forwards)")
    else:
        print("  Score-CAM at batch 8: skipped (--no-scorecam-batch8)")

    try:
        from pytorch_grad_cam import ScoreCAM
    except ImportError:
        print("pytorch-grad-cam not installed: comparison skipped (pip install -r requirements-bench.txt)")
        return
    import pytorch_grad_cam
    import tqdm

    # probability as the target score, as in ml.explain (Wang et al. score the softmax output)
    def probability_target(output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output[0])

    tqdm_init = tqdm.tqdm.__init__

    def quiet_init(self, *a, **kw):  # ScoreCAM draws a progress bar per batch
        kw["disable"] = True
        tqdm_init(self, *a, **kw)

    tqdm.tqdm.__init__ = quiet_init
    try:
        with ScoreCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
            cam.batch_size = args.scorecam_batch
            t = time.perf_counter()
            reference = cam(input_tensor=x1.clone(), targets=[probability_target])
            theirs_ms = (time.perf_counter() - t) * 1e3
    finally:
        tqdm.tqdm.__init__ = tqdm_init
    print(f"  {'pytorch-grad-cam ScoreCAM':<32} batch 1: {theirs_ms:9.1f} ms/img  {theirs_ms / base[1]:6.2f}x"
          f"  (v{pytorch_grad_cam.__version__ if hasattr(pytorch_grad_cam, '__version__') else '1.5.x'}, same batch size)")
    print(f"  exact Score-CAM is {theirs_ms / exact_ms:.2f}x faster than pytorch-grad-cam; "
          f"map correlation {correlation(exact[0], reference[0]):.4f}")


if __name__ == "__main__":
    main()
