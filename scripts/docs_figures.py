"""The pictures of the guides, made from the demo's outputs, never by hand.

Run it in the workspace after `make demo`:

    .venv/bin/python scripts/docs_figures.py [--workspace .] [--out docs/img]

It writes three PNG files:

- `anatomical-frame.png`: a de-identified demo scan with the head's ellipse (the learned
  localiser's, as the models use it), its occipito-frontal axis and the outline of the crop
  the networks see, beside that crop with the annotated masks (cerebellum, cisterna magna)
  drawn on it;
- `steward-summary.png`: a screenshot of the steward summary, `data/contract/summary.html`;
- `reviewer-report.png`: a screenshot of the latest reviewer report, `reports/*/compare.html`.

The screenshots are taken by Debian's headless Chromium (`make browser`) through Playwright,
the way the tests open the reports; requests that would leave the machine are refused. Every
input is synthetic and de-identified, so the pictures carry no identifier.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SKULL = (255, 200, 0)       # RGB
CROP = (0, 200, 255)
CEREBELLUM = (255, 80, 80)
CISTERNA = (80, 255, 120)


class FigureError(Exception):
    """A figure cannot be made; the message is one sentence saying what to do."""


def _demo_row(workspace: Path):
    """The first labelled manifest row whose scan and mask exist and whose skull fits."""
    import pandas as pd

    manifest = workspace / "data" / "manifest.parquet"
    if not manifest.is_file():
        raise FigureError(f"{manifest} is missing: run `make demo` in {workspace} first")
    rows = pd.read_parquet(manifest)
    rows = rows[rows["mask_path"].notna() & rows["label"].notna()].sort_values("image_id")
    if rows.empty:
        raise FigureError(f"{manifest} has no annotated row to draw: run `make demo` in {workspace} first")
    return rows


def anatomical_frame(workspace: Path, out: Path) -> Path:
    """The scan with its skull ellipse and crop outline, beside the crop with the masks."""
    import cv2
    import numpy as np

    from pipelines.config import load_params
    from pipelines.imaging.preprocess import PreprocessError, fit_skull, prepare_frame, warp
    from pipelines.imaging.scan import ScanError, read_scan

    params = load_params(workspace / "params.yaml")
    size, margin = params.preprocess.size, params.preprocess.crop_margin
    # the frame the models use: the head champion the head stage left, else fit_skull's
    frame_dir = workspace / params.paths.head / "frame"
    localiser = None
    if params.preprocess.frame == "learned" and (frame_dir / "head.pt").is_file():
        from pipelines.imaging.head import HeadLocaliser

        localiser = HeadLocaliser.load(frame_dir)
    for r in _demo_row(workspace).itertuples():
        path = workspace / r.deid_path
        if not path.is_file():
            continue
        spacing = (float(r.spacing_row_mm), float(r.spacing_col_mm))
        try:
            scan = read_scan(path, frame=int(r.frame))
            grey, valid = scan.frames[0], scan.valid
            fit = localiser.locate(grey, spacing) if localiser is not None else None
            skull = fit.skull if fit is not None and fit.found else fit_skull(grey, valid, spacing)
            crop_img, crop = prepare_frame(grey, valid, spacing, size, margin, skull)
        except (ScanError, PreprocessError):
            continue
        break
    else:
        raise FigureError("no de-identified demo scan in data/deid could be read and fitted: run `make demo` again")

    sr, sc = spacing
    # the full frame, in colour, with the skull ellipse, its long axis and the crop's outline
    frame = cv2.cvtColor((np.clip(np.where(valid, grey, grey * 0.6), 0, 1) * 255).astype(np.uint8),
                         cv2.COLOR_GRAY2RGB)
    thick = max(2, round(max(frame.shape) / 300))
    t = np.linspace(0, 2 * math.pi, 361)
    ca, sa = math.cos(skull.angle), math.sin(skull.angle)
    ex = skull.cx + skull.a * np.cos(t) * ca - skull.b * np.sin(t) * sa
    ey = skull.cy + skull.a * np.cos(t) * sa + skull.b * np.sin(t) * ca
    ellipse = np.stack([ex / sc, ey / sr], 1).round().astype(np.int32)
    cv2.polylines(frame, [ellipse], True, SKULL, thick, cv2.LINE_AA)
    axis = np.array([[skull.cx - skull.a * ca, skull.cy - skull.a * sa],
                     [skull.cx + skull.a * ca, skull.cy + skull.a * sa]]) / np.array([sc, sr])
    cv2.line(frame, tuple(axis[0].round().astype(int)), tuple(axis[1].round().astype(int)), SKULL, thick, cv2.LINE_AA)
    m = crop.matrix()
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5], [-0.5, size - 0.5]])
    outline = (corners @ m[:, :2].T + m[:, 2]).round().astype(np.int32)
    cv2.polylines(frame, [outline], True, CROP, thick, cv2.LINE_AA)

    # the crop the networks see, with the annotated masks warped into it (nearest neighbour)
    panel = cv2.cvtColor((crop_img * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
    mask_file = workspace / str(r.mask_path)
    if mask_file.is_file():
        mask = cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED)
        if mask is not None and mask.ndim == 2:
            labels = warp(mask.astype(np.uint8), crop, nearest=True)
            for value, colour in ((1, CEREBELLUM), (2, CISTERNA)):
                cnts, _ = cv2.findContours((labels == value).astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(panel, cnts, -1, colour, 1, cv2.LINE_AA)
    cv2.rectangle(panel, (0, 0), (size - 1, size - 1), CROP, 1)
    return _compose(frame, panel, r, crop, out)


def _compose(frame, panel, row, crop, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [1.5, 1]})
    left.imshow(frame)
    left.set_title("de-identified scan: fitted skull ellipse and its long axis (yellow),\n"
                   "the crop taken around it (blue)", fontsize=9)
    right.imshow(panel, interpolation="nearest")
    right.set_title(f"the {crop.size}-pixel crop the networks see ({crop.mm_per_px:.2f} mm/pixel):\n"
                    "annotated cerebellum (red) and cisterna magna (green)", fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"The anatomical frame (synthetic demo cohort, image {str(row.image_id)[:12]}, "
                 f"GA {float(row.ga_weeks):.1f} weeks, {row.label})", fontsize=10)
    fig.tight_layout()
    path = out / "anatomical-frame.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 1400) -> Path:
    """The top of a local HTML page as Chromium renders it, with no request leaving the machine."""
    if not Path(CHROMIUM).is_file():
        raise FigureError("chromium is not installed: run `make browser` first")
    from playwright.sync_api import sync_playwright

    def route(r) -> None:
        if r.request.url.startswith(("file://", "data:")):
            r.continue_()
        else:
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.route("**/*", route)
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(png), full_page=False)
        finally:
            browser.close()
    return png


def steward_summary(workspace: Path, out: Path) -> Path:
    html = workspace / "data" / "contract" / "summary.html"
    if not html.is_file():
        raise FigureError(f"{html} is missing: run `make demo` (or `cbh validate`) in {workspace} first")
    return screenshot(html, out / "steward-summary.png", height=1000)


def reviewer_report(workspace: Path, out: Path) -> Path:
    reports = sorted((workspace / "reports").glob("*/compare.html"), key=lambda p: p.stat().st_mtime)
    if not reports:
        raise FigureError(f"no reviewer report under {workspace / 'reports'}: run `make demo` "
                          f"(or `cbh compare`) in {workspace} first")
    return screenshot(reports[-1], out / "reviewer-report.png", height=1600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", type=Path, default=ROOT, help="where `make demo` ran (default: this checkout)")
    p.add_argument("--out", type=Path, help="output folder (default: WORKSPACE/docs/img)")
    a = p.parse_args(argv)
    workspace = a.workspace.resolve()
    out = a.out or workspace / "docs" / "img"
    try:
        # check every input first, so a missing demo fails before anything is written
        _demo_row(workspace)
        if not (workspace / "data" / "contract" / "summary.html").is_file():
            raise FigureError(f"{workspace / 'data/contract/summary.html'} is missing: run `make demo` in "
                              f"{workspace} first")
        if not any((workspace / "reports").glob("*/compare.html")):
            raise FigureError(f"no reviewer report under {workspace / 'reports'}: run `make demo` in "
                              f"{workspace} first")
        out.mkdir(parents=True, exist_ok=True)
        for make in (anatomical_frame, steward_summary, reviewer_report):
            print(f"wrote {make(workspace, out)}")
    except FigureError as exc:
        print(f"docs_figures: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
