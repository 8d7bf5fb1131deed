"""Experiment trackers (`report_to`: TensorBoard, W&B) through accelerate, and the config they show."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tune.errors import ConfigError

if TYPE_CHECKING:
    from tune.runs import RunDir


def build_trackers(report_to: str, run: RunDir) -> list[Any] | None:
    """accelerate tracker objects for `report_to` (None for "none"); a missing package is a clear error."""
    if report_to == "none":
        return None
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to={report_to} needs the {package} package: pip install {package}")
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    # Tracker objects rather than names: accelerate wants a logging_dir for names, which
    # tune.training.build_accelerator does not pass.
    if report_to == "tensorboard":
        return [TensorBoardTracker(run.path.name, run.path / "tensorboard")]
    return [WandBTracker(run.path.name)]


def tracker_config(cfg: Any) -> dict[str, Any]:
    """The config as flat `a.b` -> scalar pairs (what TensorBoard's hparams and W&B accept)."""
    from tune.config import to_dict

    flat: dict[str, Any] = {}

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, bool | int | float | str):
                flat[prefix + key] = value
            else:
                flat[prefix + key] = str(value)

    walk(to_dict(cfg), "")
    return flat
