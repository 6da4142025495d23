"""The head localiser's subject split: seeded, by subject, and the diagnosis model's test
patients (`held`) never on its training or validation side."""

from __future__ import annotations

import pytest

from pipelines.training.head import split_subjects

SUBJECTS = [f"p{i:03d}" for i in range(50)] * 2          # two frames per subject


def _parts(split: dict[str, str]) -> dict[str, set[str]]:
    return {k: {s for s, v in split.items() if v == k} for k in ("train", "val", "test")}


def test_seeded_and_sized_without_held_subjects() -> None:
    split = split_subjects(SUBJECTS, 0.1, 0.2, seed=3)
    assert split == split_subjects(list(reversed(SUBJECTS)), 0.1, 0.2, seed=3)
    assert split != split_subjects(SUBJECTS, 0.1, 0.2, seed=4)
    parts = _parts(split)
    assert (len(parts["test"]), len(parts["val"]), len(parts["train"])) == (10, 5, 35)


@pytest.mark.parametrize("n_held", [4, 10, 23])
def test_held_subjects_are_test_and_count_towards_its_share(n_held: int) -> None:
    held = {f"p{i:03d}" for i in range(0, 2 * n_held, 2)} | {"not-a-subject"}
    parts = _parts(split_subjects(SUBJECTS, 0.1, 0.2, seed=3, held=held))
    assert held - {"not-a-subject"} <= parts["test"]
    assert not held & (parts["train"] | parts["val"])
    assert len(parts["test"]) == max(10, n_held) and len(parts["val"]) == 5
    assert sum(map(len, parts.values())) == 50
