"""Turn a user's source of photos into checked image records.

Sources (what `scan_source` accepts):
- a folder of images, searched recursively (hidden files and folders, e.g. macOS `._IMG.jpg`, are
  skipped); captions come from the instance prompt when given, else from `.txt` / `.caption`
  sidecars (see `tune.data.captions`), and a subject mask from a `-masklabel.png` sidecar
  (`tune.data.masks`; the mask is checked here and is never a photo itself);
- a folder with `metadata.jsonl` / `metadata.csv` (`file_name`, `text`): the Hugging Face imagefolder
  layout, read with `datasets.load_dataset("imagefolder", ...)`;
- a folder written by `Dataset.save_to_disk` (read with `datasets.load_from_disk`);
- `hf:NAME`: a Hub dataset, loaded with `datasets.load_dataset(NAME)`: the only case that may use the
  network, and only because the user wrote it;
- a `datasets.Dataset` / `DatasetDict` object.

Every image is read and fully decoded once here, in a thread pool (PIL releases the GIL while
decoding), so bad files are found before training rather than at step 3,000. Nothing is written into
the source folder; the `datasets` library's own Arrow cache goes under tune's cache dir.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.data.buckets import Bucket, choose_bucket, square_bucket
from tune.data.captions import class_image_caption, instance_caption, read_sidecar, sidecar_path
from tune.data.config import DataConfig
from tune.data.images import IMAGE_EXTENSIONS, BadImage, ImageInfo, probe_image, read_bytes
from tune.data.masks import check_mask, is_mask_file, mask_sidecar
from tune.errors import DataError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclass(frozen=True)
class ImageRecord:
    """One usable photo: where its bytes are, its size, identity, caption and bucket."""

    name: str
    """Human-readable origin: path relative to the source folder, or `<dataset>[row]`."""
    width: int
    """Width after EXIF orientation."""
    height: int
    """Height after EXIF orientation."""
    sha256: str
    """Hash of the file's bytes: the photo's identity in caches."""
    bucket: Bucket
    """Training size (width, height) under the config it was scanned with."""
    caption: str
    """Caption before per-step augmentation ("" when none)."""
    has_caption: bool
    """Whether the caption came from the photo's own sidecar / caption column (not an instance prompt)."""
    path: str | None = None
    """File to read, when the photo is a file."""
    table: int | None = None
    """Index into the dataset's `tables` when the bytes live in a `datasets` table."""
    row: int | None = None
    """Row in that table."""
    is_prior: bool = False
    """A class image for prior preservation."""
    alt_captions: tuple[str, ...] = ()
    """Other captions of the photo (a caption column holding a list); each step draws one of
    `caption` and these uniformly."""
    mask: str | None = None
    """The photo's subject mask (`<stem>-masklabel.png` beside it, `tune.data.masks`), when it has one."""


@dataclass(frozen=True)
class SkippedFile:
    """A file the loader will not train on, and why."""

    name: str
    reason: str
    detail: str = ""


@dataclass
class ScanResult:
    """Usable records and skipped files of one or more sources."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    tables: list[datasets.Dataset] = field(default_factory=list)
    """`datasets` tables that records with `table` set read their bytes from."""
    sidecars_ignored: int = 0
    """Photos whose sidecar was ignored because an instance prompt was given (and the sidecar does not
    contain it)."""
    label: str = ""
    """The source as the user named it, for messages."""

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def extend(self, other: ScanResult) -> None:
        """Append another source; its table indices are shifted past ours."""
        offset = len(self.tables)
        self.tables.extend(other.tables)
        for r in other.records:
            if r.table is not None:
                r = _replace(r, table=r.table + offset)
            self.records.append(r)
        self.skipped.extend(other.skipped)
        self.sidecars_ignored += other.sidecars_ignored


def _replace(record: ImageRecord, **changes: Any) -> ImageRecord:
    import dataclasses

    return dataclasses.replace(record, **changes)


def bucket_for(width: int, height: int, cfg: DataConfig) -> Bucket:
    """The training size of a photo under `cfg`."""
    if not cfg.bucketing:
        return square_bucket(cfg.resolution)
    return choose_bucket(
        width,
        height,
        resolution=cfg.resolution,
        step=cfg.bucket_step,
        tolerance=cfg.bucket_tolerance,
        max_aspect=cfg.bucket_max_aspect,
    )


def read_record_bytes(record: ImageRecord, tables: Sequence[datasets.Dataset]) -> bytes:
    """The encoded image bytes of a record (file or `datasets` row); read-only."""
    if record.table is not None and record.row is not None:
        value = tables[record.table][record.row]["__tune_image__"]
        return _bytes_of(value)
    assert record.path is not None
    return read_bytes(record.path)


def _bytes_of(value: Any) -> bytes:
    """Bytes of an image cell: `{"bytes", "path"}` (datasets.Image undecoded), a path, or raw bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return read_bytes(value["path"])
        raise BadImage("empty file", "image cell has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise BadImage("empty file", "0 bytes")
        return bytes(value)
    if isinstance(value, str):
        return read_bytes(value)
    raise BadImage("not an image", f"image cell is a {type(value).__name__}")


def _probe_all(loaders: Sequence[Callable[[], bytes]], cfg: DataConfig) -> list[ImageInfo | BadImage]:
    def probe(load: Callable[[], bytes]) -> ImageInfo | BadImage:
        try:
            return probe_image(load(), min_side=cfg.min_side, max_pixels=cfg.max_pixels)
        except BadImage as e:
            return e
        except OSError as e:  # permission denied, vanished file, I/O error
            return BadImage("unreadable", f"{type(e).__name__}: {e}")

    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(probe, loaders))


def visible_images(root: Path) -> list[Path]:
    """Every image file under `root`, recursive and sorted, as the loader reads a photo folder."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.thumbnails, .git) and AppleDouble "._x.jpg" files are never photos.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or is_mask_file(name):  # a photo's mask is not a photo
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / name)
    return out


def scan_folder(
    root: Path, cfg: DataConfig, *, instance_prompt: str | None = None, is_prior: bool = False
) -> ScanResult:
    """Records for every image file under `root` (recursive), with sidecar or instance-prompt captions."""
    paths = visible_images(root)
    infos = _probe_all([lambda p=p: read_bytes(p) for p in paths], cfg)
    result = ScanResult(label=str(root))
    for path, info in zip(paths, infos, strict=True):
        name = path.relative_to(root).as_posix()
        if isinstance(info, BadImage):
            result.skipped.append(SkippedFile(name, info.reason, info.detail))
            continue
        if instance_prompt is not None and is_prior:  # its own sidecar, else the class prompt
            caption, has_caption = class_image_caption(path, instance_prompt)
        elif instance_prompt is not None:  # a sidecar saying more than the prompt, else the prompt
            caption, has_caption = instance_caption(path, instance_prompt)
            result.sidecars_ignored += not has_caption and sidecar_path(path) is not None
        else:
            sidecar = read_sidecar(path)
            caption, has_caption = (sidecar or ""), sidecar is not None
        mask = mask_sidecar(path)
        if mask is not None:
            check_mask(mask, (info.width, info.height))
        result.records.append(
            ImageRecord(
                name=name,
                width=info.width,
                height=info.height,
                sha256=info.sha256,
                bucket=bucket_for(info.width, info.height, cfg),
                caption=caption,
                has_caption=has_caption,
                path=str(path),
                is_prior=is_prior,
                mask=str(mask) if mask is not None else None,
            )
        )
    return result


def scan_table(
    table: datasets.Dataset,
    cfg: DataConfig,
    *,
    label: str,
    instance_prompt: str | None = None,
    is_prior: bool = False,
) -> ScanResult:
    """Records for every row of a `datasets` table (image and caption columns from `cfg`)."""
    import datasets

    columns = list(table.column_names)
    if cfg.image_column not in columns:
        raise DataError(
            f"{label}: no image column '{cfg.image_column}' (columns: {', '.join(columns)}); "
            "set data.image_column"
        )
    if instance_prompt is None and cfg.caption_column not in columns:
        raise DataError(
            f"{label}: no caption column '{cfg.caption_column}' (columns: {', '.join(columns)}); "
            "set data.caption_column or give an instance prompt"
        )
    keep = [cfg.image_column] + ([cfg.caption_column] if instance_prompt is None else [])
    masks: list[str | None] = [None] * len(table)
    if cfg.mask_column in columns and cfg.mask_column not in keep:
        masks = _mask_paths(table, cfg.mask_column, label)
    table = table.select_columns(keep).rename_column(cfg.image_column, "__tune_image__")
    if isinstance(table.features["__tune_image__"], datasets.Image):
        # Undecoded cells ({"bytes", "path"}) let us report a bad image instead of crashing on it.
        table = table.cast_column("__tune_image__", datasets.Image(decode=False))
    cells = list(table["__tune_image__"])
    captions = list(table[cfg.caption_column]) if instance_prompt is None else [None] * len(table)
    infos = _probe_all([lambda v=v: _bytes_of(v) for v in cells], cfg)
    result = ScanResult(label=label, tables=[table])
    for row, (cell, caption, info, mask) in enumerate(zip(cells, captions, infos, masks, strict=True)):
        path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
        in_table = not (isinstance(cell, str) or (isinstance(cell, dict) and not cell.get("bytes")))
        name = f"{label}[{row}]" if in_table else str(path)
        if isinstance(info, BadImage):
            result.skipped.append(SkippedFile(name, info.reason, info.detail))
            continue
        if mask is not None:
            check_mask(mask, (info.width, info.height))
        alternatives: tuple[str, ...] = ()
        if isinstance(caption, (list, tuple)):  # several captions: one is drawn per step
            texts = [" ".join(str(c).split()) for c in caption]
            caption, alternatives = (texts[0], tuple(texts[1:])) if texts else ("", ())
        if instance_prompt is not None:
            text, has_caption = instance_prompt, False
        else:
            text = " ".join(str(caption).split()) if caption is not None else ""
            has_caption = caption is not None and text != ""
        result.records.append(
            ImageRecord(
                name=name,
                width=info.width,
                height=info.height,
                sha256=info.sha256,
                bucket=bucket_for(info.width, info.height, cfg),
                caption=text,
                has_caption=has_caption,
                path=None if in_table else str(path),
                table=0 if in_table else None,
                row=row if in_table else None,
                is_prior=is_prior,
                alt_captions=alternatives if instance_prompt is None else (),
                mask=mask,
            )
        )
    return result


def _mask_paths(table: datasets.Dataset, column: str, label: str) -> list[str | None]:
    """Each row's subject-mask file (None for an empty cell). Masks are read from files, as an imagefolder's
    `mask_file_name` column gives them; a column of anything else (image bytes inside the table, labels) is
    not read as masks, with a warning, and the rows train without one."""
    import datasets

    if isinstance(table.features[column], datasets.Image):
        table = table.cast_column(column, datasets.Image(decode=False))
    paths: list[str | None] = []
    for cell in table[column]:
        path = cell.get("path") if isinstance(cell, dict) and not cell.get("bytes") else cell
        if path is not None and not isinstance(path, str):
            logger.warning(
                "%s: the %r column does not hold mask files (an imagefolder's mask_file_name); its rows train "
                "without masks (set data.mask_column to the column that names them)",
                label,
                column,
            )
            return [None] * len(table)
        paths.append(path or None)
    named = [p for p in paths if p is not None]
    if named and not any(os.path.isfile(p) for p in named):
        logger.warning(
            "%s: the %r column names no file that exists; its rows train without masks", label, column
        )
        return [None] * len(table)
    return paths


def _datasets_cache(cache_dir: Path) -> str:
    return str(cache_dir / "datasets")


def scan_source(
    source: str | Path | datasets.Dataset | datasets.DatasetDict,
    cfg: DataConfig,
    *,
    cache_dir: Path,
    instance_prompt: str | None = None,
    is_prior: bool = False,
) -> ScanResult:
    """Check every image of one source (see the module docstring for what a source is)."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        source = _pick_split(source, cfg, "the dataset")
    if isinstance(source, datasets.Dataset):
        return scan_table(source, cfg, label="dataset", instance_prompt=instance_prompt, is_prior=is_prior)
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX) :]
        try:
            table = datasets.load_dataset(name, split=cfg.split, cache_dir=_datasets_cache(cache_dir))
        except Exception as e:  # network, auth, missing split: all the user's to fix
            raise DataError(f"cannot load Hub dataset '{name}': {e}") from None
        return scan_table(table, cfg, label=source, instance_prompt=instance_prompt, is_prior=is_prior)
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"no such folder: {root} (for a Hugging Face Hub dataset write {HUB_PREFIX}NAME)")
    if not root.is_dir():
        raise DataError(f"{root} is a file; give the folder that holds the photos")
    if any((root / f).is_file() for f in _SAVED_DATASET_FILES):
        try:
            loaded = datasets.load_from_disk(str(root))
        except Exception as e:
            raise DataError(f"{root}: looks like a saved dataset but cannot be loaded: {e}") from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, cfg, str(root))
        return scan_table(loaded, cfg, label=str(root), instance_prompt=instance_prompt, is_prior=is_prior)
    if any((root / f).is_file() for f in _METADATA_FILES):
        try:
            table = datasets.load_dataset(
                "imagefolder", data_dir=str(root), split=cfg.split, cache_dir=_datasets_cache(cache_dir)
            )
        except Exception as e:
            raise DataError(f"{root}: cannot read it as an imagefolder with metadata: {e}") from None
        result = scan_table(table, cfg, label=str(root), instance_prompt=instance_prompt, is_prior=is_prior)
        # Show paths relative to the folder, as for a plain folder.
        result.records = [_replace(r, name=_relative(r.name, root)) for r in result.records]
        result.skipped = [SkippedFile(_relative(s.name, root), s.reason, s.detail) for s in result.skipped]
        return result
    return scan_folder(root, cfg, instance_prompt=instance_prompt, is_prior=is_prior)


def _relative(name: str, root: Path) -> str:
    try:
        return Path(name).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return name


def _pick_split(dd: datasets.DatasetDict, cfg: DataConfig, label: str) -> datasets.Dataset:
    if cfg.split not in dd:
        raise DataError(f"{label} has no split '{cfg.split}' (splits: {', '.join(dd)}); set data.split")
    return dd[cfg.split]
