"""What the loader would make of a folder, before any training: the work behind `tune data check`.

`check_data` finds the usable image count, every skipped file with its reason, caption coverage (usable
images with their own caption sidecar / caption column) and the bucket histogram; `format_report`
writes them as text. Reads only; writes nothing into the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tune.data.buckets import Bucket, histogram
from tune.data.cache import resolve_cache_dir
from tune.data.config import DataConfig
from tune.data.masks import MASK_SUFFIX, mask_path
from tune.data.sources import ImageRecord, SkippedFile, scan_source


@dataclass(frozen=True)
class DataReport:
    """What `tune data check` found, as data."""

    source: str
    """The folder (or dataset) as given."""
    usable: int
    """Images the loader would train on."""
    skipped: tuple[SkippedFile, ...]
    """Every file left out, with its reason."""
    captioned: int
    """Usable images with a caption of their own (sidecar or caption column)."""
    masked: int
    """Usable images with a subject mask (tune.data.masks)."""
    buckets: dict[Bucket, int]
    """Usable images per bucket (width, height)."""
    resolution: int
    """The resolution the buckets were computed for."""
    bucketing: bool
    """False: every image is a square crop."""
    mask_sources: tuple[str, ...] = ()
    """Where those masks came from: "-masklabel.png" (sidecars beside the photos), the mask column's name."""

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        return counts


def check_data(source: str | Path, cfg: DataConfig | None = None) -> DataReport:
    """Scan `source` like the loader does (no instance prompt, so sidecars count) and report."""
    cfg = cfg or DataConfig()
    scan = scan_source(source, cfg, cache_dir=resolve_cache_dir(cfg.cache_dir))
    return DataReport(
        source=str(source),
        usable=len(scan.records),
        skipped=tuple(scan.skipped),
        captioned=sum(1 for r in scan.records if r.has_caption),
        masked=sum(1 for r in scan.records if r.mask is not None),
        mask_sources=tuple(sorted({_mask_source(r, cfg) for r in scan.records if r.mask is not None})),
        buckets=histogram(r.bucket for r in scan.records),
        resolution=cfg.resolution,
        bucketing=cfg.bucketing,
    )


def format_report(report: DataReport) -> str:
    """The human-readable report `tune data check` prints."""
    lines = [f"{report.source}: {report.usable} usable images, {len(report.skipped)} skipped"]
    if report.skipped:
        lines.append("skipped:")
        width = max(len(s.name) for s in report.skipped)
        for s in report.skipped:
            detail = f" ({s.detail})" if s.detail else ""
            lines.append(f"  {s.name:<{width}}  {s.reason}{detail}")
    if report.usable:
        pct = 100 * report.captioned / report.usable
        lines.append(f"captions: {report.captioned} of {report.usable} usable images have one ({pct:.0f}%)")
        if report.masked:
            where = " and ".join(report.mask_sources)
            lines.append(f"subject masks ({where}): {report.masked} of {report.usable} usable images")
        mode = "buckets" if report.bucketing else "square crops"
        lines.append(f"{mode} at {report.resolution} px (width x height: images):")
        top = max(report.buckets.values())
        for (w, h), n in report.buckets.items():
            bar = "#" * max(1, round(30 * n / top))
            lines.append(f"  {f'{w}x{h}':>9}  {n:>5}  {bar}")
    return "\n".join(lines)


def _mask_source(record: ImageRecord, cfg: DataConfig) -> str:
    """Where a record's mask came from: its photo's `-masklabel.png` sidecar (the name the scan found), or
    the table's mask column."""
    sidecar = record.path is not None and str(mask_path(record.path)) == record.mask
    return MASK_SUFFIX if sidecar else f"the {cfg.mask_column!r} column"
