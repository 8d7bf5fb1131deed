"""The one error type users see.

Anything raised as a `TuneError` is a problem with the user's input or environment that we can
describe in one line; the CLI prints it as `tune: error: <message>` and exits with code 2. Every
other exception is a bug in tune and keeps its traceback.
"""


class TuneError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


class ConfigError(TuneError):
    """A bad config key, value, type or choice."""


class DataError(TuneError):
    """Unusable input data (photo folder, captions, dataset)."""


class ModelError(TuneError):
    """A base model, checkpoint or LoRA file that cannot be loaded."""


class TrainingError(TuneError):
    """Training cannot go on (e.g. the loss stayed NaN); the run's checkpoints are left as they were."""
