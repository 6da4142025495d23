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


def test_an_order_key_makes_the_split_independent_of_the_names() -> None:
    """The stage orders subjects by their pixels' digest: renaming every subject (another
    pseudonymisation key) leaves each frame on the same side of the split."""
    digest = {f"p{i:03d}": f"{(i * 37) % 101:04d}" for i in range(50)}
    renamed = {s: f"q{(i * 13) % 50:03d}x" for i, s in enumerate(sorted(digest))}
    split = split_subjects(SUBJECTS, 0.1, 0.2, seed=3, order=digest)
    other = split_subjects([renamed[s] for s in SUBJECTS], 0.1, 0.2, seed=3,
                           order={renamed[s]: d for s, d in digest.items()})
    assert {s: other[renamed[s]] for s in digest} == split
    # without the key the renaming moves subjects between the sides
    plain = split_subjects([renamed[s] for s in SUBJECTS], 0.1, 0.2, seed=3)
    assert {s: plain[renamed[s]] for s in digest} != split_subjects(SUBJECTS, 0.1, 0.2, seed=3)
