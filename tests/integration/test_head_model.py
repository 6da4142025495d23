"""The learned head localiser end to end on a few real HC18 frames, shrunk: 64 px, 2 epochs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import HeadSection
from pipelines.imaging.head import HeadFit, HeadLocaliser, hc_mm
from pipelines.training.head import (
    annotation_check,
    arrays_from_pairs,
    evaluate_head,
    head_quality,
    load_hc18,
    load_head,
    split_subjects,
    train_head,
)

HC18 = Path(__file__).resolve().parents[3] / "shared" / "data" / "hc18-subset"   # ../shared beside the checkout
pytestmark = pytest.mark.skipif(not (HC18 / "pixel_size_and_hc.csv").is_file(),
                                reason=f"HC18 subset not present at {HC18}")


@pytest.fixture(scope="module")
def items():
    with open(HC18 / "pixel_size_and_hc.csv", newline="") as fh:
        names = [r["filename"] for r in csv.DictReader(fh)][:12]
    return load_hc18(HC18, names)


def test_reference_masks_match_the_expert_hc(items) -> None:
    from pipelines.imaging.head import ellipse_from_mask

    for it in items:
        e = ellipse_from_mask(it.mask.astype(np.float32), it.spacing, method="moments")
        assert abs(hc_mm(e.a, e.b) - it.hc_mm) < 0.5


def test_train_locate_evaluate(items, tmp_path) -> None:
    torch.set_num_threads(1)
    params = dataclasses.replace(HeadSection(), size=64, features=(4, 8, 16, 32, 64, 4), max_epochs=2, batch_size=4)
    split = split_subjects([it.subject for it in items], 0.2, 0.2, params.seed)
    assert split == split_subjects([it.subject for it in items], 0.2, 0.2, params.seed)
    train = [it for it in items if split[it.subject] == "train"]
    val = [it for it in items if split[it.subject] == "val"]
    assert train and val and not {it.subject for it in train} & {it.subject for it in val}
    assert params.refine                                  # the default: a second pass on a crop
    with pytest.raises(ValueError, match="crops"):
        train_head(arrays_from_pairs(((it.grey, it.mask) for it in train), params.size),
                   arrays_from_pairs(((it.grey, it.mask) for it in val), params.size), params)
    net, seconds = train_head(arrays_from_pairs(((it.grey, it.mask) for it in train), params.size, True, 0),
                              arrays_from_pairs(((it.grey, it.mask) for it in val), params.size), params)
    assert seconds > 0
    loc = HeadLocaliser(net, params.size, head_quality(params), tta=True, refine=True)
    fits = loc.locate_batch([it.grey for it in items], [it.spacing for it in items])
    assert len(fits) == len(items) and all(isinstance(f, HeadFit) for f in fits)
    for f in fits:
        assert (f.found and f.hc_mm is not None and math.isfinite(f.hc_mm)) or (not f.found and f.hc_mm is None
                                                                               and f.reason)
    assert isinstance(loc.locate(items[0].grey, items[0].spacing), HeadFit)
    metrics = evaluate_head(loc, val)
    assert {"n", "dice_mean", "hc_mae_mean", "hc_mae_median", "hc_mae_p90", "refused_share",
            "ms_per_image"} <= metrics.keys()
    assert 0.0 <= metrics["dice_mean"] <= 1.0 and 0.0 <= metrics["refused_share"] <= 1.0
    # saved as the benchmark saves it, it reloads into a localiser giving the same answer
    path = tmp_path / "head.pt"
    torch.save(net.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"params": dataclasses.asdict(params), "train_seconds": seconds}))
    again, again_params = load_head(path)
    assert again_params == params
    assert again.locate(items[0].grey, items[0].spacing) == loc.locate(items[0].grey, items[0].spacing)


@pytest.mark.slow          # all 500 HC18 annotations (make test-full)
def test_annotation_check_runs() -> None:
    chk = annotation_check(HC18)
    assert chk["n"] > 0 and chk["padfix_mean"] < 0.5
