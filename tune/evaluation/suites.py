"""Evaluation suites: TOML files in eval/ (see eval/default.toml), parsed strictly by `load_suite`, and
where each suite's report lands in a run directory (`suite_eval_dir`).
"""

from __future__ import annotations

import string
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from tune.config import suggest
from tune.errors import ConfigError
from tune.paths import DATA_ROOT, find_path, missing_shipped

SUITES_DIR = DATA_ROOT / "eval"
DEFAULT_SUITE = "default"
RUN_GUIDANCE = "run"
"""A suite's `guidance` that draws each run at its own scale: its config's `sample.guidance`."""


@dataclass(frozen=True)
class Suite:
    """One evaluation suite (an eval/*.toml file)."""

    name: str
    """The suite's name: its `name` key, else the file's stem."""
    prompts: tuple[str, ...]
    """Prompt templates; {token} and {class} are filled in from the run's subject."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds, one image per prompt each (at least two: diversity compares them). `images_per_prompt = N`
    in the file means seeds 0 .. N-1."""
    steps: int = 20
    """Denoising steps per image."""
    guidance: float | str = 6.0
    """Classifier-free guidance scale, or "run" (`RUN_GUIDANCE`): the run's own, the `sample.guidance` its
    validation samples were drawn at (`drawn_at` puts the number in before anything is drawn)."""
    scheduler: str = ""
    """Sampler (ddim, ddpm, euler, euler_a, dpmpp_2m); "" means the base model's own."""
    negative_prompt: str = ""
    """Negative prompt ("" for none)."""
    batch_size: int = 2
    """Seeds per sampler call (faster; the same in every model of a report, so comparisons stay fair)."""
    description: str = ""
    """One line about what the suite measures."""

    def drawn_at(self, run_guidance: float | None, override: float | None = None) -> Suite:
        """This suite with a number for its guidance: `override` when given, else the suite's own number,
        else (guidance "run") `run_guidance`, the run's config's `sample.guidance`."""
        if override is not None:
            return replace(self, guidance=float(override))
        if self.guidance != RUN_GUIDANCE:
            return self
        if run_guidance is None:
            raise ConfigError(
                f"suite {self.name} draws at the run's own guidance (guidance = \"run\"), but the run's "
                "config has no sample.guidance; give one (tune eval --guidance G)"
            )
        return replace(self, guidance=float(run_guidance))


_SUITE_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "description": str,
    "prompts": list,
    "seeds": list,
    "images_per_prompt": int,
    "steps": int,
    "guidance": (int, float, str),
    "scheduler": str,
    "negative_prompt": str,
    "batch_size": int,
}


def find_suite(name: str | Path) -> Path:
    """A suite file: the path as given when it exists, else eval/<name>.toml (./eval, then the shipped one)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = find_path(Path("eval") / (path.name if path.suffix == ".toml" else f"{path.name}.toml"))
    if shipped.is_file():
        return shipped
    if not SUITES_DIR.is_dir():
        raise ConfigError(f"suite {name} not found: {missing_shipped('eval')}, or pass a suite file")
    names = sorted(p.stem for p in SUITES_DIR.glob("*.toml"))
    raise ConfigError(
        f"suite {name} not found{suggest(path.stem, names)}; shipped suites: {', '.join(names)}"
    )


def load_suite(name: str | Path = DEFAULT_SUITE) -> Suite:
    """Read a suite strictly: unknown keys, wrong types and bad values are ConfigErrors naming the key."""
    from tune.sampling import SCHEDULERS

    path = find_suite(name)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    for key, value in table.items():
        if key not in _SUITE_TYPES:
            raise ConfigError(f"{path}: unknown key '{key}'{suggest(key, list(_SUITE_TYPES))}")
        expected = _SUITE_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"{path}: '{key}' has the wrong type ({type(value).__name__}); got {value!r}")
    if isinstance(table.get("guidance"), str) and table["guidance"] != RUN_GUIDANCE:
        raise ConfigError(
            f"{path}: 'guidance' must be a number or \"{RUN_GUIDANCE}\" (the run's own sample.guidance); "
            f"got {table['guidance']!r}"
        )
    prompts = table.get("prompts")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"{path}: 'prompts' must be a non-empty list of prompt strings")
    for prompt in prompts:
        _check_template(prompt, path)
    if "seeds" in table and "images_per_prompt" in table:
        raise ConfigError(f"{path}: give 'seeds' or 'images_per_prompt', not both")
    seeds = table.get("seeds", list(range(table.get("images_per_prompt", 2))))
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < 2:
        raise ConfigError(
            f"{path}: need at least two distinct integer seeds (diversity compares the images of a prompt); "
            f"got {seeds!r}"
        )
    values = {k: v for k, v in table.items() if k not in ("seeds", "images_per_prompt", "prompts")}
    suite = Suite(**{"name": path.stem, **values, "prompts": tuple(prompts), "seeds": tuple(seeds)})
    if suite.steps < 1 or suite.batch_size < 1:
        raise ConfigError(
            f"{path}: 'steps' and 'batch_size' must be >= 1; got {suite.steps}, {suite.batch_size}"
        )
    if suite.scheduler and suite.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"{path}: unknown scheduler '{suite.scheduler}'{suggest(suite.scheduler, list(SCHEDULERS))}; "
            f"choose from {', '.join(SCHEDULERS)} or ''"
        )
    return suite


def _check_template(template: str, path: Path) -> None:
    try:
        names = {n for _, n, _, _ in string.Formatter().parse(template) if n is not None}
    except ValueError as err:
        raise ConfigError(f"{path}: prompt {template!r} is not a valid template ({err})") from None
    unknown = names - {"token", "class"}
    if unknown:
        raise ConfigError(
            f"{path}: prompt {template!r} uses {{{sorted(unknown)[0]}}}; only {{token}} and {{class}} are filled in"
        )


def suite_folder(suite_name: str) -> PurePosixPath:
    """A suite's folder inside a run directory: eval/ for the default suite, eval/<name>/ for any other,
    so that running several suites keeps every report. A name that would share eval/ with the image
    folders (base/, step_NNNNNN/) or is not one plain folder name is a ConfigError."""
    if suite_name == DEFAULT_SUITE:
        return PurePosixPath("eval")
    if suite_name.lower() == "base" or suite_name.lower().startswith("step_"):
        raise ConfigError(
            f"suite name {suite_name!r} clashes with the image folders eval/base/ and eval/step_NNNNNN/; "
            "rename the suite (its file, or its 'name' key)"
        )
    if suite_name in ("", ".", "..") or any(c in suite_name for c in "/\\"):
        raise ConfigError(
            f"suite name {suite_name!r} is not a plain folder name (its report goes to eval/<name>/); "
            "rename the suite (its file, or its 'name' key)"
        )
    return PurePosixPath("eval", suite_name)


def suite_eval_dir(run_path: str | Path, suite_name: str) -> Path:
    """Where `suite_name`'s report.json, report.md and image folders go in a run directory."""
    return Path(run_path) / suite_folder(suite_name)
