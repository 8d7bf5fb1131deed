"""bench/described_subjects.py's scoring: the share of verdicts that show the subject, and of each part of
its look read right (only the parts the subject has)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tune.world.judge import Verdict
from tune.world.subjects import SUBJECTS

from bench_testkit import load_bench_script


def test_score_counts_the_subject_and_each_part_of_its_look() -> None:
    score = load_bench_script("described_subjects.py").score
    person = SUBJECTS["w-person"]  # green hair, yellow shirt, purple spots
    right = Verdict("person", "yellow", "spotted", "purple", "green", "red", "photo", "large", "center", 0.9)
    blue_spots = replace(right, color2="blue")
    white_shirt = replace(right, color="white", hair="red")
    found, parts = score(person, [right, blue_spots, white_shirt, right])
    assert found == 0.5
    assert parts == {"cls": 1.0, "color": 0.75, "pattern": 1.0, "color2": 0.75, "hair": 0.75}
    ring = SUBJECTS["sks-toy"]  # either order of its colours counts (found, and both colours); no hair
    swapped = Verdict("ring", "teal", "striped", "pink", None, "red", "photo", "large", "center", 0.9)
    found, parts = score(ring, [swapped, replace(swapped, color2="white")])
    assert found == 0.5 and parts == pytest.approx({"cls": 1, "color": 0.5, "pattern": 1, "color2": 0.5})


def test_looks_parse_into_subjects_that_the_world_allows() -> None:
    import argparse

    parse_look = load_bench_script("described_subjects.py").parse_look
    spotted = parse_look("person:yellow:spotted:red:green")
    assert spotted.description == "person with green hair in a yellow shirt with red spots"
    assert (spotted.class_word, spotted.color2, spotted.hair) == ("person", "red", "green")
    plain = parse_look("cup:blue:plain::")
    assert plain.description == "blue cup" and (plain.color2, plain.hair, plain.class_word) == (
        None,
        None,
        "toy",
    )
    right = Verdict("cup", "blue", "plain", None, None, "red", "photo", "large", "center", 0.9)
    assert plain.found(right) and not plain.found(replace(right, color="green"))
    for bad in (
        "person:yellow:spotted:red",
        "cup:blue:plain:red:",
        "person:yellow:plain::",
        "cup:mauve:plain::",
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_look(bad)
