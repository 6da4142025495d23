"""The head stage's localiser on its own test subjects, one row per site: where a workspace
mixes sources (synthetic scanners, a held-out scanner, `cbh import hc18`'s real frames), the
stage's single test figure hides which of them the head transfers to.

Run in a workspace where the `head` stage has run (its output: `paths.head`):

    .venv/bin/python benchmarks/head_by_site.py

Reads the stage's saved localiser and its subject split (`split.json`); scores only the test
subjects, which the localiser never trained on. Prints one JSON line per site and a markdown
table (Dice, HC absolute error, bias, share refused). Site names are the de-identified
manifest's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from flows.stages import _head_items
from pipelines.config import load_params
from pipelines.imaging.head import HeadLocaliser
from pipelines.training.head import evaluate_head


def main() -> None:
    root = Path(".")
    params = load_params(root / "params.yaml")
    out = root / params.paths.head
    if not (out / "split.json").is_file():
        raise SystemExit(f"{out}: no split.json: run the head stage first (cbh stage head)")
    subjects = json.loads((out / "split.json").read_text())["subjects"]
    localiser = HeadLocaliser.load(out)
    site = dict(pq.read_table(root / params.paths.manifest, columns=["image_id", "site"]).to_pandas()
                .itertuples(index=False, name=None))
    test = [it for it in _head_items(params, root) if subjects.get(it.subject) == "test"]
    rows = []
    for name in sorted({str(site.get(it.name)) for it in test}):
        got = evaluate_head(localiser, [it for it in test if str(site.get(it.name)) == name])
        rows.append({"site": name, **{k: round(v, 4) for k, v in got.items()}})
        print(json.dumps(rows[-1]))
    print("\n| site (test subjects) | frames | Dice | HC error mean / median / 90th pct. | bias | refused |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['site']}` | {r['n']:.0f} | {r['dice_mean']:.3f} | {r['hc_mae_mean']:.2f} / "
              f"{r['hc_mae_median']:.2f} / {r['hc_mae_p90']:.2f} mm | {r['hc_bias_mean']:+.2f} mm | "
              f"{100 * r['refused_share']:.0f} % |")


if __name__ == "__main__":
    main()
