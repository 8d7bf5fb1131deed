"""`tune data check`: the report as data, the printed report, exit codes, and a read-only folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tune.cli.data import configure_check, run_check
from tune.data.check import check_data, format_report
from tune.data.config import DataConfig
from tune.data.loader import build_dataloader, build_dataset
from tune.errors import DataError

from data_testkit import BAD_FILES, GOOD_FILES, tree_hashes


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tune data check")
    configure_check(parser)
    return parser.parse_args(list(argv))


def test_report_as_data(corpus: Path) -> None:
    report = check_data(corpus)
    assert report.usable == len(GOOD_FILES) == 7
    assert {s.name: s.reason for s in report.skipped} == BAD_FILES
    assert report.reason_counts() == {"truncated": 1, "empty file": 1, "not an image": 2, "too small": 1}
    assert report.captioned == 2  # nested/street.txt and wide.caption
    assert sum(report.buckets.values()) == 7
    assert report.buckets[(1024, 256)] == 1  # the 800x100 panorama, at the 4:1 limit
    assert report.buckets[(384, 576)] == 1  # the EXIF-rotated photo is portrait


def test_run_check_on_the_mixed_folder(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(corpus)
    assert run_check(parse(str(corpus))) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"{corpus}: 7 usable images, 5 skipped" in out
    for name, reason in BAD_FILES.items():
        assert any(name in line and reason in line for line in out.splitlines()), name
    assert "captions: 2 of 7 usable images" in out
    assert "1024x256" in out and "512x512" in out
    assert tree_hashes(corpus) == before


def test_run_check_options(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(parse(str(corpus), "--resolution", "256", "--min-side", "90")) == 0
    out, _ = capsys.readouterr()
    assert "3 usable images, 9 skipped" in out and "buckets at 256 px" in out  # only sides >= 90 stay


def test_run_check_on_only_bad_files(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in BAD_FILES:
        (bad / name).write_bytes((corpus / name).read_bytes())
    assert run_check(parse(str(bad))) == 2
    out, err = capsys.readouterr()
    assert "0 usable images, 5 skipped" in out
    assert len(err.strip().splitlines()) == 1 and "no usable images" in err and "Traceback" not in err


def test_run_check_on_an_empty_or_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(parse(str(tmp_path))) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(DataError, match="no such folder"):
        run_check(parse(str(tmp_path / "missing")))


def test_folder_is_byte_identical_after_loading_and_caching(corpus: Path, tmp_path: Path) -> None:
    from tune.data.loader import cache_latents

    from data_testkit import make_tiny_vae

    before = tree_hashes(corpus)
    cfg = DataConfig(resolution=64, bucket_step=8, flip=True, cache_latents=True)
    ds = build_dataset(corpus, cfg, cache_dir=tmp_path / "cache")
    cache_latents(ds, make_tiny_vae())
    for _ in build_dataloader(ds, batch_size=2):
        pass
    check_data(corpus)
    assert tree_hashes(corpus) == before


def test_format_report_lists_every_skipped_file(corpus: Path) -> None:
    text = format_report(check_data(corpus))
    skipped_block = text.split("skipped:\n")[1].split("captions:")[0]
    assert len(skipped_block.strip().splitlines()) == 5
