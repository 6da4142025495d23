"""Commissioning a site's operating point: a threshold for one scanner group, set on its own
labelled scans, with a stated guarantee, recorded on the model version it belongs to.

The threshold chosen on validation data does not transfer between scanners (docs/results.md,
held-out sites: specificity 0.13 on one, sensitivity 0.87 on another). Re-choosing it with
the validation rule on a few local patients repairs the median but leaves one draw in four
under 0.90 sensitivity at 40 patients (`benchmarks/commission.py`). So the local threshold is
set with the Neyman-Pearson umbrella rule (Tong, Feng and Li, Science Advances 2018), which
needs no assumption about the score distribution: over the n hypoplasia patients, one
image each, sorted by probability s(1) <= ... <= s(n), the threshold s(k) leaves a new
patient's image under it with probability F(s(k)) ~ Beta(k, n - k + 1), so

    P(sensitivity < m) = P(Beta(k, n - k + 1) > 1 - m) = P(Binomial(n, 1 - m) < k)

and the largest k with that probability <= 1 - confidence is taken. With none, even k = 1
(below every local positive) is not safe enough: the cohort is too small, and nothing is
recorded. For m = 0.90 at 95% confidence that takes 29 hypoplasia patients.

Patients, not images, are the independent units: a patient's images share anatomy and exam.
Each hypoplasia patient counts with one of its images, drawn at random (seeded), which is an
independent draw from the images the sensitivity is about (each patient weighing the same).
Its lowest image instead would promise more (every image of a patient called) and pay for it:
on a held-out synthetic scanner it cut the specificity to 0.33 where one random image gave
0.69-0.92 over three seeds (docs/results.md, commissioning).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import beta, binom

from pipelines.errors import CbhError
from pipelines.evaluation.metrics import sensitivity_specificity

SITE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TAG_PREFIX = "commission."


class CommissionError(CbhError, ValueError):
    """The local scans cannot set a threshold with the guarantee asked for (too few, one class)."""


def check_site(site: str) -> str:
    """A site is a scanner-group label (as in annotations.csv's `site`), used in registry tag
    keys: letters, digits, '-', '_', '.', at most 64 characters."""
    if not SITE_PATTERN.match(site or ""):
        raise CommissionError(f"site {site!r} is not a label of letters, digits, '-', '_' or '.' "
                              f"(at most 64 characters); use the scanner group's label, not a hospital's name")
    return site


def min_positives(min_sensitivity: float, confidence: float) -> int:
    """Hypoplasia patients needed before any local threshold carries the guarantee: the
    smallest n with m^n <= 1 - confidence (k = 1: the threshold under every local positive)."""
    if not (0 < min_sensitivity < 1 and 0 < confidence < 1):
        raise CommissionError("min_sensitivity and confidence must lie in (0, 1)")
    return int(math.ceil(math.log(1 - confidence) / math.log(min_sensitivity) - 1e-12))


def violation_probability(n: int, k: int, min_sensitivity: float) -> float:
    """P(true sensitivity < m) when the threshold is the k-th lowest of n positive scores."""
    return float(binom.cdf(k - 1, n, 1 - min_sensitivity))


def umbrella_threshold(positive_scores: NDArray, min_sensitivity: float, confidence: float) -> tuple[float, int]:
    """The Neyman-Pearson umbrella threshold and its rank k (1-based) among the sorted scores:
    the highest order statistic whose chance of a sensitivity under `min_sensitivity` is at
    most 1 - confidence. Scores at or above it are called hypoplasia."""
    s = np.sort(np.asarray(positive_scores, float))
    n = s.size
    need = min_positives(min_sensitivity, confidence)
    if n < need:
        raise CommissionError(f"{n} patients with hypoplasia; a threshold that keeps sensitivity >= "
                              f"{min_sensitivity:.2f} with {confidence:.0%} confidence needs at least {need}")
    ks = np.arange(1, n + 1)
    ok = binom.cdf(ks - 1, n, 1 - min_sensitivity) <= 1 - confidence
    k = int(ks[ok].max())
    return float(s[k - 1]), k


def clopper_pearson(x: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval of a proportion x/n (NaN when n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    a = 1 - confidence
    lo = 0.0 if x == 0 else float(beta.ppf(a / 2, x, n - x + 1))
    hi = 1.0 if x == n else float(beta.ppf(1 - a / 2, x + 1, n - x))
    return lo, hi


@dataclass(frozen=True)
class Commissioning:
    site: str
    images: int
    patients: int
    hypoplasia_patients: int
    normal_patients: int
    min_sensitivity: float
    confidence: float
    needed_hypoplasia_patients: int
    trained_threshold: float
    trained_patient_sensitivity: float          # share of hypoplasia patients whose every image is called
    trained_patient_sensitivity_low: float      # its exact one-sided lower bound at `confidence`
    trained_image_sensitivity: float
    trained_image_specificity: float
    threshold: float | None                     # the umbrella threshold; None when the cohort is too small
    rank: int | None
    violation_probability: float | None
    image_sensitivity: float | None             # at `threshold`, on the same (commissioning) scans
    image_specificity: float | None
    reason: str
    # the segmenter on this site (no threshold depends on these; the biometry does)
    outside_share: float = float("nan")         # images whose cerebellum left the skull (label-free)
    test_outside_share: float = float("nan")    # the same on the model's frozen test set
    outside_excess: bool = False                # significantly above it (one-sided binomial, p < 0.01)
    tcd_images: int = 0                         # images with a sonographer's TCD (annotations' tcd_mm)
    tcd_mae_mm: float = float("nan")
    tcd_bias_mm: float = float("nan")           # predicted minus measured
    biometry_ok: bool | None = None             # TCD error within commission.max_tcd_error_mm (None: unmeasured)

    def tags(self) -> dict[str, str]:
        """Registry tags (counts and thresholds only: no patient, file or date)."""
        d = asdict(self)
        site = d.pop("site")
        # thresholds exactly (repr round-trips): a rounded-up threshold would miss the very image it is set at
        return {f"{TAG_PREFIX}{site}.{k}": ("" if v is None else (repr(v) if k.endswith("threshold") else
                                                                   f"{v:.6g}" if isinstance(v, float) else str(v)))
                for k, v in d.items()}


def one_image_per_patient(patients: NDArray, y: NDArray, p: NDArray, seed: int) -> NDArray[np.float64]:
    """For each hypoplasia patient (in sorted key order), the probability of one of its
    hypoplasia images drawn at random with `seed`."""
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(p[(patients == i) & (y == 1)]) for i in np.unique(patients[y == 1])], float)


def commission(patients: NDArray, y: NDArray, p: NDArray, trained_threshold: float, site: str,
               min_sensitivity: float, confidence: float, segmentation: dict[str, Any] | None = None,
               seed: int = 0) -> Commissioning:
    """Per image: patient key (any hashable, held in memory only), label (1 hypoplasia),
    probability. Returns the check of the trained threshold and the umbrella threshold over
    one image per hypoplasia patient (drawn with `seed`), with `segmentation`
    (`segmentation_check`) alongside."""
    patients, y, p = np.asarray(patients), np.asarray(y).astype(int), np.asarray(p, float)
    check_site(site)
    if y.size == 0:
        raise CommissionError("no labelled image could be scored")
    ids = np.unique(patients)
    pos_ids = np.unique(patients[y == 1])
    neg_ids = np.setdiff1d(ids, pos_ids)
    worst = np.array([p[(patients == i) & (y == 1)].min() for i in pos_ids])
    detected = int(np.sum(worst >= trained_threshold))
    lo, _ = clopper_pearson(detected, len(pos_ids), 2 * confidence - 1)     # one-sided at `confidence`
    sens_t, spec_t = sensitivity_specificity(y, p, trained_threshold)
    need = min_positives(min_sensitivity, confidence)
    base: dict[str, Any] = dict(
        site=site, images=int(y.size), patients=int(ids.size), hypoplasia_patients=int(pos_ids.size),
        normal_patients=int(neg_ids.size), min_sensitivity=min_sensitivity, confidence=confidence,
        needed_hypoplasia_patients=need, trained_threshold=float(trained_threshold),
        trained_patient_sensitivity=detected / len(pos_ids) if len(pos_ids) else float("nan"),
        trained_patient_sensitivity_low=lo, trained_image_sensitivity=sens_t, trained_image_specificity=spec_t,
        **(segmentation or {}))
    if neg_ids.size == 0:
        return Commissioning(**base, threshold=None, rank=None, violation_probability=None, image_sensitivity=None,
                             image_specificity=None, reason="no normal patient: specificity cannot be checked")
    try:
        drawn = one_image_per_patient(patients, y, p, seed)
        thr, k = umbrella_threshold(drawn, min_sensitivity, confidence)
    except CommissionError as exc:
        return Commissioning(**base, threshold=None, rank=None, violation_probability=None, image_sensitivity=None,
                             image_specificity=None, reason=str(exc))
    sens, spec = sensitivity_specificity(y, p, thr)
    return Commissioning(**base, threshold=thr, rank=k,
                         violation_probability=violation_probability(len(drawn), k, min_sensitivity),
                         image_sensitivity=sens, image_specificity=spec,
                         reason=f"rank {k} among {len(drawn)} hypoplasia patients' scores, one image each")


def excess(k: int, n: int, p0: float, alpha: float = 0.01) -> bool:
    """Is k of n significantly more than the rate p0 (one-sided exact binomial test)? p0 is
    floored at 0.01: a test set that never saw the event still allows it now and then."""
    if n == 0 or not np.isfinite(p0):
        return False
    return bool(binom.sf(k - 1, n, max(p0, 0.01)) < alpha)


def segmentation_check(outside: NDArray, test_outside: float, tcd_pred: NDArray, tcd_ref: NDArray,
                       max_tcd_error: float, min_images: int = 10) -> dict[str, Any]:
    """The site's segmenter QC: the share of images whose cerebellum left the skull against the
    model's test set, and the TCD error against the sonographers' own measurements."""
    outside = np.asarray(outside, bool)
    both = np.isfinite(np.asarray(tcd_pred, float)) & np.isfinite(np.asarray(tcd_ref, float))
    diff = np.asarray(tcd_pred, float)[both] - np.asarray(tcd_ref, float)[both]
    mae = float(np.abs(diff).mean()) if diff.size else float("nan")
    return {"outside_share": float(outside.mean()) if outside.size else float("nan"),
            "test_outside_share": float(test_outside),
            "outside_excess": excess(int(outside.sum()), int(outside.size), test_outside),
            "tcd_images": int(diff.size), "tcd_mae_mm": mae,
            "tcd_bias_mm": float(diff.mean()) if diff.size else float("nan"),
            "biometry_ok": bool(mae <= max_tcd_error) if diff.size >= min_images else None}


def site_tag(tags: dict[str, str], site: str, key: str) -> str:
    """One of `site`'s commissioning figures among a model version's tags ("" when absent):
    the one place that knows how `Commissioning.tags` names them."""
    return tags.get(f"{TAG_PREFIX}{site}.{key}", "")


def site_threshold(tags: dict[str, str], site: str) -> float | None:
    """The commissioned threshold of `site` among a model version's tags, or None."""
    value = site_tag(tags, site, "threshold")
    return float(value) if value else None


# -- the command's work: score a labelled local cohort, record on the model version ---------

def registered_version(model_uri: str) -> tuple[str, str]:
    """(name, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`: a commissioned
    threshold belongs to one registered version, so other URIs cannot carry one."""
    from mlflow import MlflowClient

    m = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/(\d+))$", model_uri)
    if not m:
        raise CommissionError(f"{model_uri}: a site threshold belongs to a registered model version; "
                              f"use models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = m.groups()
    if alias:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    return name, str(version)


def version_tags(name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(name, version).tags)


@dataclass(frozen=True)
class OperatingPoint:
    """A site's commissioned threshold on the model version it belongs to."""

    uri: str                  # models:/NAME/VERSION: fixed, should an alias move meanwhile
    name: str
    version: str
    site: str
    threshold: float
    tags: dict[str, str]

    @property
    def biometry_warning(self) -> str:
        """A sentence when the site's TCD error exceeded the limit at commissioning, else ""."""
        if site_tag(self.tags, self.site, "biometry_ok") != "False":
            return ""
        return (f"on site {self.site} the TCD error was {float(site_tag(self.tags, self.site, 'tcd_mae_mm')):.2f} "
                f"mm at commissioning: its TCD, CM and centiles are not reliable")


def operating_point(model_uri: str, site: str) -> OperatingPoint:
    """The threshold commissioned for `site` on the version `model_uri` names now; a version
    without one is refused in one sentence."""
    name, version = registered_version(model_uri)
    tags = version_tags(name, version)
    threshold = site_threshold(tags, check_site(site))
    if threshold is None:
        raise CommissionError(f"{name} version {version} has no threshold commissioned for site {site!r}; "
                              f"run `cbh commission COHORT --site {site}` on labelled scans of that site")
    return OperatingPoint(f"models:/{name}/{version}", name, version, site, threshold, tags)


def serving_config(point: OperatingPoint) -> dict[str, Any]:
    """The pyfunc `model_config` that makes a served version call hypoplasia at the site's
    threshold (MLflow's scoring server reads it from SERVING_MODEL_CONFIG). A version logged
    before its model_config had the key would silently ignore it, so it is refused."""
    from mlflow.models import get_model_info
    from mlflow.models.model import MODEL_CONFIG

    logged = get_model_info(point.uri).flavors.get("python_function", {}).get(MODEL_CONFIG) or {}
    if "threshold" not in logged:
        raise CommissionError(f"{point.name} version {point.version} was registered before served models "
                              f"could take a site's threshold; serve it without --site and apply the "
                              f"threshold {point.threshold!r} to hypoplasia_probability, or retrain")
    return {"threshold": point.threshold, "site": point.site}


def score_cohort(cohort, site: str, model_uri: str) -> dict[str, Any]:
    """Predict on a labelled cohort folder (CONTRACT.md section 1) with the model's own
    inference, masks predicted; rows of other sites are left out when the cohort names sites.
    Returns, per scored image, `patients` (keys), `y` (1 hypoplasia), `p` (probability),
    `outside` (segmenter QC), `tcd_pred` and `tcd_ref` (the annotation's tcd_mm, NaN where
    none); `counts` of what was left out; the model's trained `threshold`. Patient keys stay
    in memory: the caller reduces them to counts."""
    import pydicom

    from pipelines.data.ingest import read_annotations
    from pipelines.serving.plane import ga_problem
    from pipelines.serving.predict import load_model, predict_items, prediction_inputs

    rows = read_annotations(cohort)
    items = prediction_inputs(cohort, None, False)
    sites = {(r.get("site") or "").strip() for r in rows}
    keep = [i for i, r in enumerate(rows) if (r.get("site") or "").strip() == site] if sites - {""} else \
        list(range(len(rows)))
    if not keep:
        raise CommissionError(f"{cohort}: no row of annotations.csv has site {site!r} "
                              f"(sites there: {', '.join(sorted(sites - {''}))})")
    counts = {"rows": len(keep), "other_sites": len(rows) - len(keep), "unlabelled": 0, "unreadable": 0,
              "without_usable_GA": 0}
    labelled = [i for i in keep if (rows[i].get("label") or "").strip() in ("normal", "hypoplasia")]
    counts["unlabelled"] = len(keep) - len(labelled)
    model = load_model(model_uri)
    preds, _ = predict_items([items[i] for i in labelled], model, None)
    patients, y, p, outside, tcd_pred, tcd_ref = [], [], [], [], [], []
    for i, pred in zip(labelled, preds, strict=True):
        prob = pred.get("hypoplasia_probability")
        if prob is None or prob == "" or (isinstance(prob, float) and math.isnan(prob)):
            # a GA the model is not given for (missing, outside 14-42 weeks) is no measurement of it
            counts["without_usable_GA" if ga_problem(items[i][3]) else "unreadable"] += 1
            continue
        pid = (rows[i].get("patient_id") or "").strip()
        if not pid:
            try:
                pid = str(pydicom.dcmread(items[i][0], stop_before_pixels=True).get("PatientID", "") or "").strip()
            except Exception:  # boundary: its header cannot be read again; its path may name the patient
                pid = ""
        if not pid:
            counts["unreadable"] += 1          # a patient cannot be told apart: not an independent unit
            continue
        patients.append(pid)
        y.append(1 if rows[i]["label"].strip() == "hypoplasia" else 0)
        p.append(float(prob))
        outside.append(bool(pred.get("_outside")))
        tcd_pred.append(float(pred["tcd_mm"]) if pred.get("tcd_mm") is not None else float("nan"))
        try:
            tcd_ref.append(float(rows[i].get("tcd_mm") or "nan"))
        except ValueError:
            tcd_ref.append(float("nan"))
    return {"patients": np.array(patients, dtype=object), "y": np.array(y, int), "p": np.array(p, float),
            "outside": np.array(outside, bool), "tcd_pred": np.array(tcd_pred, float),
            "tcd_ref": np.array(tcd_ref, float), "counts": counts, "threshold": float(model.predictor.cfg.threshold)}


def version_metric(name: str, version: str, key: str) -> float:
    """A metric of the run that registered the version (NaN when absent)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    return float(client.get_run(client.get_model_version(name, version).run_id).data.metrics.get(key, float("nan")))


def record(name: str, version: str, result: Commissioning, audit) -> None:
    """Tags on the model version, and a record in the promotion audit trail (`audit`: a Trail)."""
    import datetime as dt
    import getpass

    from mlflow import MlflowClient

    from pipelines.locks import exclusive_lock
    from pipelines.registry.promote import Decision, append_record, settle

    if result.threshold is None:
        raise CommissionError(f"site {result.site}: {result.reason}; nothing recorded")
    client = MlflowClient()
    with exclusive_lock(audit.lock):
        settle(client, audit, name)
        # the record first: a threshold in force is never one the trail does not name
        _, mac, line_no = append_record(audit, Decision(
            time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), user=getpass.getuser(),
            action="commission", decision="commissioned",
            reason=f"site {result.site}, version {version}: {result.reason}; "
                   f"sensitivity >= {result.min_sensitivity:.2f} with {result.confidence:.0%} confidence",
            challenger=version, previous_champion=None,
            champion=None, model=name,
            metrics={"hypoplasia_patients": float(result.hypoplasia_patients),
                     "normal_patients": float(result.normal_patients),
                     "image_specificity": float(result.image_specificity)},
            thresholds={"trained": result.trained_threshold, result.site: float(result.threshold)}))
        for key, value in result.tags().items():
            client.set_model_version_tag(name, version, key, value)
        audit.anchor(client, name, mac, line_no)


def commission_site(cohort, site: str, name: str, version: str, p) -> tuple[Commissioning, dict[str, int]]:
    """`cbh commission` without the printing: score the site's labelled cohort with the
    registered version, check its segmenter, set the umbrella threshold (`p`: the
    CommissionParams). Records nothing."""
    from pathlib import Path

    cohort = Path(cohort)
    if not (cohort / "annotations.csv").is_file():
        raise CommissionError(f"{cohort}: no annotations.csv; commissioning needs a labelled cohort of the site")
    check_site(site)
    scored = score_cohort(cohort, site, f"models:/{name}/{version}")
    seg = segmentation_check(scored["outside"], version_metric(name, version, "test_cerebellum_outside_head"),
                             scored["tcd_pred"], scored["tcd_ref"], p.max_tcd_error_mm)
    result = commission(scored["patients"], scored["y"], scored["p"], scored["threshold"], site,
                        p.min_sensitivity, p.confidence, seg, p.seed)
    return result, scored["counts"]


def recommission(name: str, version: str, p, audit) -> dict[str, str]:
    """After a retrain: every site of `commission.cohorts` that the version has no threshold
    for is commissioned on it (recorded where the rule allows). One line per site; a site
    that cannot be commissioned stays without a threshold, so `cbh predict --site` refuses it
    rather than use another version's."""
    tags = version_tags(name, version)
    out: dict[str, str] = {}
    for site, cohort in sorted((p.cohorts or {}).items()):
        if site_threshold(tags, site) is not None:
            out[site] = f"already commissioned on version {version}"
            continue
        try:
            result, _ = commission_site(cohort, site, name, version, p)
            if result.threshold is None:
                out[site] = f"not commissioned: {result.reason}"
                continue
            record(name, version, result, audit)
            out[site] = (f"commissioned at {result.threshold:.4f} on version {version}"
                         + ("; biometry unreliable there" if result.biometry_ok is False else ""))
        except CommissionError as exc:                 # our own sentences: counts and the configured folder
            out[site] = f"not commissioned: {exc}"
        except Exception as exc:  # boundary: the flow goes on; a library's message may quote a file name
            out[site] = f"not commissioned: {type(exc).__name__} while scoring its cohort (run `cbh commission " \
                        f"COHORT --site {site}` to see it)"
    return out


__all__ = ["Commissioning", "CommissionError", "check_site", "clopper_pearson", "commission", "commission_site",
           "excess", "min_positives", "one_image_per_patient", "recommission", "record", "registered_version",
           "score_cohort", "segmentation_check", "site_tag", "site_threshold", "umbrella_threshold", "version_metric",
           "version_tags", "violation_probability"]
