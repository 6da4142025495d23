"""The learned head localiser on real fetal-head ultrasound (HC18), against the classical
`fit_skull` on the same frames.

Trains on the train subjects; the ellipse method and flip TTA are chosen on the validation
subjects; the test subjects are looked at once, at the end. One CPU thread by default.

    .venv/bin/python benchmarks/head_hc18.py [--data ../shared/data/hc18-subset]
        [--out data/head-benchmark/head_hc18.pt] [--save-localiser DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.head import make_head_net  # noqa: E402
from pipelines.config import HeadSection  # noqa: E402
from pipelines.imaging.head import hc_mm  # noqa: E402
from pipelines.imaging.preprocess import PreprocessError, fit_skull  # noqa: E402
from pipelines.training.head import (  # noqa: E402
    annotation_check,
    arrays_from_pairs,
    choose_localiser,
    evaluate_head,
    load_hc18,
    split_subjects,
    train_head,
)

COLS = ("n", "dice_mean", "hc_mae_mean", "hc_mae_median", "hc_mae_p90", "hc_bias_mean", "refused_share",
        "ms_per_image")


def baseline(items) -> dict[str, float]:
    """fit_skull's HC error on the same frames (a refusal raises PreprocessError)."""
    errs, refused, start = [], 0, time.perf_counter()
    for it in items:
        try:
            s = fit_skull(it.grey, np.ones(it.grey.shape, bool), it.spacing)
        except PreprocessError:
            refused += 1
            continue
        errs.append(hc_mm(s.a, s.b) - it.hc_mm)
    signed = np.asarray(errs) if errs else np.asarray([math.nan])
    e = np.abs(signed)
    return {"n": float(len(items)), "dice_mean": math.nan, "hc_mae_mean": float(e.mean()),
            "hc_mae_median": float(np.median(e)), "hc_mae_p90": float(np.percentile(e, 90)),
            "hc_bias_mean": float(signed.mean()),
            "refused_share": refused / max(len(items), 1),
            "ms_per_image": (time.perf_counter() - start) * 1000 / max(len(items), 1)}


def row(label: str, m: dict[str, float]) -> str:
    return f"{label:<40}" + "".join(f"{m[c]:>14.3f}" if c != "n" else f"{int(m[c]):>6d}" for c in COLS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/hc18-subset")
    # outside data/head: that folder is the head stage's DVC output, rebuilt whole
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "head-benchmark" / "head_hc18.pt")
    ap.add_argument("--save-localiser", type=Path,
                    help="save the localiser chosen on validation (HeadLocaliser.save) here, "
                         "for cbh predict --head-model")
    defaults = HeadSection()                 # params.yaml's head: section (a unit test keeps them equal)
    ap.add_argument("--size", type=int, default=defaults.size)
    ap.add_argument("--epochs", type=int, default=defaults.max_epochs)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--refine", action=argparse.BooleanOptionalAction, default=defaults.refine,
                    help="train on refining crops too and run a second pass on a crop around the head")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-test", action="store_true", help="stop after the validation table")
    ap.add_argument("--load", type=Path, help="evaluate this saved state dict (its .json: params) instead of training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = dataclasses.replace(defaults, size=args.size, max_epochs=args.epochs, lr=args.lr,
                                 refine=args.refine)
    if args.load:
        saved = json.loads(args.load.with_suffix(".json").read_text())
        params = HeadSection(**saved.pop("params"))
    print("params:", params)

    chk = annotation_check(args.data)
    print("annotation check (filled annotation -> moments ellipse -> Ramanujan HC vs CSV HC, abs mm): "
          + ", ".join(f"{k} {v:.3f}" for k, v in chk.items()))

    items = load_hc18(args.data)
    split = split_subjects([it.subject for it in items], params.val_fraction, params.test_fraction, params.seed)
    parts = {k: [it for it in items if split[it.subject] == k] for k in ("train", "val", "test")}
    print("frames: " + ", ".join(f"{k} {len(v)} ({len({it.subject for it in v})} subjects)" for k, v in parts.items()))
    if args.load:
        net = make_head_net(params.features)
        net.load_state_dict(torch.load(args.load, map_location="cpu"))
        net.eval()
        seconds = float(saved["train_seconds"])
        print(f"loaded {args.load} (trained in {seconds:.1f} s)")
    else:
        train = arrays_from_pairs(((it.grey, it.mask) for it in parts["train"]), params.size, params.refine,
                                  params.seed)
        val = arrays_from_pairs(((it.grey, it.mask) for it in parts["val"]), params.size)
        net, seconds = train_head(train, val, params)
        print(f"training: {seconds:.1f} s, {params.max_epochs} epochs, {torch.get_num_threads()} thread(s)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), args.out)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"params": dataclasses.asdict(params), "train_seconds": seconds}, indent=1))
        print(f"state dict saved: {args.out}")

    header = f"{'':<40}" + "".join(f"{c:>14}" if c != "n" else f"{c:>6}" for c in COLS)
    print("\nVALIDATION subjects (choice of ellipse method and TTA)\n" + header)
    chosen, table = choose_localiser(net, params, parts["val"])
    for label, m in table:
        print(row(f"learned {label}", m))
    if args.save_localiser:
        chosen.save(args.save_localiser)
        print(f"localiser saved: {args.save_localiser} (cbh predict --head-model {args.save_localiser})")
    print(row("fit_skull (classical)", baseline(parts["val"])))
    label = f"learned {chosen.method} tta={chosen.tta} level={chosen.level} refine={chosen.refine}"
    print(f"chosen on validation: {label}")
    if chosen.refine:                         # its first pass is its own: the figures as it will run
        print(row("the chosen one, as saved", evaluate_head(chosen, parts["val"])))
    if args.no_test:
        return

    print("\nTEST subjects (once)\n" + header)
    print(row(label, evaluate_head(chosen, parts["test"])))
    print(row("fit_skull (classical)", baseline(parts["test"])))
    print(f"training seconds {seconds:.1f}")


if __name__ == "__main__":
    main()
