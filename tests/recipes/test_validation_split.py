"""The photos held out for the validation loss: a fixed choice, at least one, never all."""

from __future__ import annotations

import pytest

from tune.data.sources import ImageRecord
from tune.errors import ConfigError
from tune.personalize.validation import held_out_records


def record(name: str, sha: str, is_prior: bool = False) -> ImageRecord:
    return ImageRecord(name, 64, 64, sha, (64, 64), "a photo", False, is_prior=is_prior)


def test_held_out_photos_are_chosen_by_content_not_order() -> None:
    photos = [record(f"p{i}.jpg", sha) for i, sha in enumerate("dbeac")]
    held = held_out_records(photos, 0.4)
    assert [r.sha256 for r in held] == ["a", "b"]
    assert held_out_records(photos[::-1], 0.4) == held
    assert [r.sha256 for r in held_out_records(photos, 0.01)] == ["a"]  # at least one
    assert held_out_records(photos + [record("class.png", "0", is_prior=True)], 0.2)[0].sha256 == "a"
    assert held_out_records(photos, 0.0) == []


def test_holding_out_every_photo_is_refused() -> None:
    with pytest.raises(ConfigError, match="leaving none to train on"):
        held_out_records([record("only.jpg", "a")], 0.2)
