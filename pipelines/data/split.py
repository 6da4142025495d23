"""Patient-level split with a temporal, frozen test set (the paper split by exam date).

The latest patients by first exam (the fifth of patients their real first exam date falls in,
taken at ingest on the identified side) form the test set the first time; that
membership is then frozen: later cohorts never change it. New images of a frozen test
patient are held out (split `excluded`) rather than trained on, so no patient crosses
splits. Validation patients are drawn at random (seeded) from the rest, per label, in an order
the pseudonymisation key does not change.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def assign_splits(manifest: pd.DataFrame, frozen: pd.DataFrame | None, test_fraction: float,
                  val_fraction: float, seed: int, test_site: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (dataset with a `split` column, frozen test table [image_id, patient_pseudo]).

    By default the test set is temporal (the latest patients by first exam). With
    `test_site`, it is every patient scanned at that site: a site (scanner, vendor) the
    model never sees in training or validation, the harder external-validation protocol.
    """
    df = manifest.copy()
    df["split"] = "unlabelled"
    labelled = df["label"].notna()
    # the real order of first exams, as the fifth of patients each falls in (ingest, identified
    # side), where every labelled row has it; within a fifth, and for a manifest built before
    # it, the shifted dates, whose order the per-patient shift blurs
    keys = ["first_exam_period", "exam_date"] if "first_exam_period" in df \
        and df.loc[labelled, "first_exam_period"].notna().all() else ["exam_date"]
    first = df[labelled].groupby("patient_pseudo")[keys].min().sort_values(keys, kind="stable")
    if frozen is None or frozen.empty:
        if test_site:
            test_patients = set(df.loc[labelled & (df["site"] == test_site), "patient_pseudo"])
            if not test_patients:
                raise ValueError(f"split.test_site = {test_site!r}: no labelled image from that site")
        else:
            n_test = max(1, int(round(test_fraction * len(first))))
            test_patients = set(first.index[-n_test:])
        test_images = set(df.loc[labelled & df["patient_pseudo"].isin(test_patients), "image_id"])
        frozen = df.loc[df["image_id"].isin(test_images), ["image_id", "patient_pseudo"]]
        frozen = frozen.sort_values("image_id").reset_index(drop=True)
    test_patients = set(frozen["patient_pseudo"])
    test_images = set(frozen["image_id"])
    df.loc[df["image_id"].isin(test_images), "split"] = "test"
    held = labelled & df["patient_pseudo"].isin(test_patients) & ~df["image_id"].isin(test_images)
    df.loc[held, "split"] = "excluded"
    rest = labelled & ~df["patient_pseudo"].isin(test_patients)
    rng = np.random.default_rng(seed)
    patient_label = df[rest].groupby("patient_pseudo")["label"].agg(lambda s: s.mode().iat[0])
    # the draw runs over the patients in the order of their cleaned pixels' digest, which the
    # pseudonymisation key does not change: the same data and seed give the same validation
    # patients in every workspace (sorted pseudonyms would reshuffle with each key)
    order = df[rest].groupby("patient_pseudo")["pixel_sha256"].min() \
        if "pixel_sha256" in df and df.loc[rest, "pixel_sha256"].notna().all() else None
    val: set[str] = set()
    for _, group in patient_label.groupby(patient_label):
        names = sorted(group.index, key=lambda name: (order[name], name) if order is not None else ("", name))
        k = int(round(val_fraction * len(names)))
        val.update(rng.choice(names, size=k, replace=False).tolist() if k else [])
    df.loc[rest, "split"] = np.where(df.loc[rest, "patient_pseudo"].isin(val), "val", "train")
    if "pixel_sha256" in df and df["pixel_sha256"].notna().all():
        # rows in a key-free order too: training reads them in this order, and a seeded shuffle
        # of a differently ordered table is another sequence of batches
        df = df.sort_values(["pixel_sha256", "image_id"], kind="stable").reset_index(drop=True)
    return df, frozen


def split_summary(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per split and label, for the flow's summary and MLflow."""
    counts = df.groupby(["split", df["label"].fillna("none")]).size()
    out: dict[str, dict[str, int]] = {}
    for (split, label), n in counts.items():
        out.setdefault(split, {})[label] = int(n)
    return out
