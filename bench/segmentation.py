"""Segmentation summaries: what reducing (N, C, H, W) maps to per-image numbers costs.

    uv run --frozen python bench/segmentation.py [--images 16] [--classes 21] [--size 256] [--repeats 5]

In the same run, on the same random logits (float32, like a PyTorch head's output), it
measures the median of ``--repeats`` runs of

* the reference: ``torch.softmax`` over the class axis of the batch (what any consumer of
  a segmentation model's output does first);
* ``segmentation_summaries`` on those probabilities (mean / top-q entropy, per-class
  uncertain fractions, a 16×16 map), NumPy, one image at a time;
* ``PixelBald.add`` of one pass (what each MC-dropout pass adds);
* the whole ``InferenceRunner(segmentation=True)`` over a tiny conv net against a bare
  ``model(x)`` + softmax loop over the same loader (``--runner``),

and prints each time and its ratio to the reference. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexing.segmentation import PixelBald, segmentation_summaries  # noqa: E402


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runner", action="store_true", help="also time the inference runner end to end")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(0, 3, (args.images, args.classes, args.size, args.size)).astype(np.float32))
    probs = torch.softmax(logits, dim=1).numpy()
    ref = _median(lambda: torch.softmax(logits, dim=1), args.repeats)
    rows = [("torch.softmax (reference)", ref)]
    rows.append(("segmentation_summaries", _median(lambda: segmentation_summaries(probs, validate=False),
                                                   args.repeats)))
    rows.append(("segmentation_summaries, validated", _median(lambda: segmentation_summaries(probs),
                                                              args.repeats)))
    rows.append(("PixelBald.add (one pass)", _median(lambda: PixelBald().add(probs, validate=False),
                                                     args.repeats)))
    print(f"{args.images} images x {args.classes} classes x {args.size}x{args.size}, one torch thread, "
          f"medians of {args.repeats}")
    for name, t in rows:
        print(f"  {name:36s} {t * 1000:9.1f} ms   {t / ref:6.2f}x")
    if args.runner:
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        from indexing.inference import InferenceRunner

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, args.classes, 1)).eval()
        x = torch.rand(args.images * 4, 3, args.size, args.size)
        loader = DataLoader(TensorDataset(x), batch_size=args.images)

        def bare() -> None:
            with torch.inference_mode():
                for (b,) in loader:
                    torch.softmax(model(b), dim=1).numpy()

        def runner() -> None:
            InferenceRunner(model_name="seg", segmentation=True, progress=False, device="cpu").run(model, loader)

        tb, tr = _median(bare, args.repeats), _median(runner, args.repeats)
        print(f"  runner over {len(x)} images: bare loop {tb * 1000:.0f} ms, runner {tr * 1000:.0f} ms, "
              f"{tr / tb:.2f}x the bare loop")


if __name__ == "__main__":
    main()
