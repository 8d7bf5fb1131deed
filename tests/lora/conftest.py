"""Fixtures shared by the LoRA tests."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def no_library_warnings() -> Iterator[None]:
    """Fail on any warning diffusers, PEFT or transformers log or warn while the block runs (unloaded,
    unexpected or missing keys, unmatched alpha_pattern entries, load reports)."""
    capture = _Capture()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.setLevel(logging.WARNING)  # conftest silences them to ERROR
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(capture)
            logger.setLevel(level)
    logged = [f"{r.name}: {r.getMessage()[:300]}" for r in capture.records]
    warned = [
        f"{w.category.__name__}: {str(w.message)[:300]}"
        for w in caught
        if issubclass(w.category, (RuntimeWarning, UserWarning))
    ]
    assert not logged and not warned, "\n".join(logged + warned)
