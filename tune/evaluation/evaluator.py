"""The evaluator: one suite, one subject, any number of models (the base model, then checkpoints).

`Evaluator.evaluate(pipe, step)` draws the suite's prompts x seeds with `pipe` as it is through the
shared sampler into `<folder>/<label>/` (`base`, `step_000200`, ...: images, grid.png, prompts.json)
and scores them with `tune.metrics`. The folder is the suite's own (`suite_eval_dir`): `eval/` for the
default suite, `eval/<suite name>/` for any other, so each suite keeps its report:

    subject_fidelity   CLIP-I: mean cosine of the images with the concept's photos (subject prompts only)
    dino_fidelity      the same with DINO (--dino), else null
    prompt_fidelity    CLIP-T: mean cosine of each image with its prompt, the token left out
    diversity          mean pairwise CLIP distance among the seeds of one prompt (0 = collapse)
    subject_found      share of subject images the world judge sees the subject in (its look read from the
                       concept's photos), else null (photos that are not of one world subject)
    subject_parts      what a miss comes from: {part: share of the subject images that read that part of
                       the look right} for cls, color, pattern, color2, hair (`tune.metrics.look_parts`),
                       else null
    background_right   share of images on the background (colour or surface) their prompt named, else null
    style_right        share of images in the style their prompt named, else null
    prompt_right       share of images without the subject whose every named attribute is drawn, else null
    subject_in_others  share of images without the token that show the subject anyway (language drift)
    trigger_on_subject share of the token's cross-attention mass at the last step that falls on the
                       subject (pixels unlike the background: tune.attention.share_on_subject), mean over
                       the subject images; maps recorded while drawing them (the same images)

"Subject prompts" are the suite's prompts with `{token}`; a prompt without it ("a photo of {class}",
a world caption) shows whether the model still draws other things. The judge figures need the
world judge (models/world-judge); without it they are null.

`write()` writes the folder's report.json and report.md (see `tune.evaluation.report`). `start_training_eval`
builds the evaluator the lora and dreambooth recipes run every `eval_every` steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.durable import write_atomic
from tune.errors import ConfigError, DataError
from tune.evaluation.report import decide, format_markdown
from tune.evaluation.suites import Suite, load_suite, suite_folder
from tune.runs import step_dir_name

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    from tune.metrics import Clip, Dino

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSubject:
    """What the run taught: its token, class word and photos."""

    token: str
    class_word: str
    photos: Path

    def render(self, template: str, *, token: bool = True) -> str:
        """Fill {token} and {class}; `token=False` leaves the token out (the CLIP-T text)."""
        text = template.replace("{token}", self.token if token else "").replace("{class}", self.class_word)
        return " ".join(text.split())


def load_photos(folder: Path) -> list[Image.Image]:
    """The concept's photos as RGB images (EXIF rotation applied)."""
    from PIL import Image, ImageOps

    if not folder.is_dir():
        raise DataError(f"the concept photos folder {folder} does not exist; was the run moved?")
    from tune.data.sources import visible_images

    photos = []
    for path in visible_images(folder):  # the photos the loader trains on (never their masks)
        try:
            with Image.open(path) as image:
                photos.append(ImageOps.exif_transpose(image).convert("RGB"))
        except OSError as err:
            log.warning("skipping %s: %s", path, err)
    if not photos:
        raise DataError(f"no photos in {folder}; subject fidelity compares generated images with them")
    return photos


def _load_judge() -> Any:
    """The shipped world judge, or None when this checkout has none (its figures are then null)."""
    from tune.world.scoring import try_load_judge

    return try_load_judge()


class Evaluator:
    """Scores pipelines on one suite for one subject and keeps the report (report.json, report.md in the
    suite's folder of the run: `eval/`, or `eval/<suite name>/`)."""

    def __init__(
        self,
        suite: Suite,
        subject: EvalSubject,
        run_path: Path | None,
        *,
        clip: str | Path,
        dino: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        from tune import metrics

        self.folder = suite_folder(suite.name)  # a suite named like an image folder fails before loading
        self.suite, self.subject = suite.drawn_at(None), subject  # guidance "run": the caller's drawn_at
        self.run_path = Path(run_path) if run_path is not None else None
        self.clip: Clip = metrics.load_clip(clip, device)
        self.dino: Dino | None = metrics.load_dino(dino, device) if dino else None
        photos = load_photos(subject.photos)
        self.reference_clip = self.clip.image_embeddings(photos)
        self.reference_dino = self.dino.image_embeddings(photos) if self.dino else None
        self.judge = _load_judge()
        self.look = metrics.subject_look(photos, self.judge)
        self.prompts = [subject.render(p) for p in suite.prompts]
        self.clip_texts = [subject.render(p, token=False) for p in suite.prompts]
        self.is_subject = ["{token}" in p for p in suite.prompts]  # none: a drift suite, no subject figures
        self.base: dict[str, Any] | None = None
        self.checkpoints: list[dict[str, Any]] = []

    @property
    def eval_dir(self) -> Path:
        if self.run_path is None:
            raise RuntimeError("attach(run_path) the evaluator to a run directory first")
        return self.run_path / self.folder

    def attach(self, run_path: Path, step: int = 0) -> None:
        """Write into the suite's folder of `run_path`; a run resumed at `step` > 0 keeps its report so far."""
        self.run_path = Path(run_path)
        if step > 0:
            self.resume(step)

    def evaluate(
        self,
        pipe: DiffusionPipeline,
        step: int,
        *,
        base: bool = False,
        accelerator: Any = None,
        modules: Sequence[torch.nn.Module] = (),
        progress: bool = True,
    ) -> dict[str, Any]:
        """Draw the suite with `pipe` as it is now into <folder>/<label>/, score it and add it to the report
        (`base=True`: as the base model). `modules` are put in eval mode meanwhile."""
        from tune.attention import share_on_subject
        from tune.sampling import sample_grid

        label = "base" if base else step_dir_name(step)
        folder = self.eval_dir / label
        record = any(self.is_subject) and bool(self.subject.token.strip())  # maps for trigger_on_subject
        modes = [(m, m.training) for m in modules]
        for m, _ in modes:
            m.eval()
        try:
            autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
            with autocast:
                samples = sample_grid(
                    pipe,
                    self.prompts,
                    list(self.suite.seeds),
                    folder,
                    steps=self.suite.steps,
                    guidance=self.suite.guidance,
                    scheduler=self.suite.scheduler or None,
                    negative_prompt=self.suite.negative_prompt or None,
                    batch_size=self.suite.batch_size,
                    progress=progress,
                    attention=record,
                )
        finally:
            for m, mode in modes:
                m.train(mode)
        shares = [
            share_on_subject(s.attention, self.subject.token, s.image, pipe.tokenizer)
            for s in samples
            if record and self.is_subject[s.prompt_index]
        ]
        scores = self.score([s.image for s in samples], shares)
        entry = {"label": label, "step": 0 if base else step, **scores}
        entry["images"] = f"{self.folder}/{label}/"  # relative to the run directory
        if base:
            self.base = entry
        else:
            self.checkpoints = sorted([c for c in self.checkpoints if c["step"] != step] + [entry], key=_step)
        return entry

    def score(self, images: Sequence[Image.Image], trigger_shares: Sequence[float] = ()) -> dict[str, Any]:
        """The metrics of images drawn prompt-major for the suite (image i*S + j: prompt i, seed j);
        `trigger_shares`: each subject image's share_on_subject (none: trigger_on_subject is null)."""
        from tune import metrics

        n_seeds = len(self.suite.seeds)
        prompt_of = [i // n_seeds for i in range(len(images))]
        subject_images = [im for im, i in zip(images, prompt_of, strict=True) if self.is_subject[i]]
        prompts = [self.prompts[i] for i in prompt_of]
        others = [
            (im, self.prompts[i]) for im, i in zip(images, prompt_of, strict=True) if not self.is_subject[i]
        ]
        other_images, other_prompts = [im for im, _ in others], [p for _, p in others]
        embeddings = self.clip.image_embeddings(images)
        subject_rows = [k for k, i in enumerate(prompt_of) if self.is_subject[i]]
        groups = {str(i): embeddings[i * n_seeds : (i + 1) * n_seeds] for i in range(len(self.prompts))}
        found, parts = metrics.subject_found_and_parts(subject_images, self.look, self.judge)
        result: dict[str, Any] = {
            "subject_fidelity": metrics.subject_fidelity(
                embeddings[subject_rows], self.reference_clip, self.clip
            )
            if subject_rows
            else None,
            "prompt_fidelity": metrics.prompt_fidelity(
                embeddings, [self.clip_texts[i] for i in prompt_of], self.clip
            ),
            "diversity": metrics.diversity(groups, self.clip),
            "dino_fidelity": None,
            "subject_found": found,
            "subject_parts": parts,
            "background_right": metrics.background_right(images, prompts, self.judge),
            "style_right": metrics.style_right(images, prompts, self.judge),
            "prompt_right": metrics.prompt_right(other_images, other_prompts, self.judge),
            "subject_in_others": metrics.subject_found(other_images, self.look, self.judge),
            "trigger_on_subject": sum(trigger_shares) / len(trigger_shares) if trigger_shares else None,
        }
        if self.dino is not None and self.reference_dino is not None and subject_images:
            result["dino_fidelity"] = metrics.subject_fidelity(subject_images, self.reference_dino, self.dino)
        return {k: _rounded(v) for k, v in result.items()}

    @property
    def best_step(self) -> int | None:
        return decide(self.base, self.checkpoints)[0]

    def report(self) -> dict[str, Any]:
        best_step, overfit, reason = decide(self.base, self.checkpoints)
        return {
            "suite": self.suite.name,
            "clip_model": str(self.clip.path),
            "dino_model": str(self.dino.path) if self.dino else None,
            "prompts": self.prompts,
            "seeds": list(self.suite.seeds),
            "steps": self.suite.steps,
            "guidance": float(self.suite.guidance),
            "base": self.base,
            "checkpoints": self.checkpoints,
            "best_step": best_step,
            "overfit": overfit,
            "overfit_reason": reason,
        }

    def evaluate_in_training(
        self,
        pipe: DiffusionPipeline,
        step: int,
        keep_best: Callable[[], None],
        *,
        accelerator: Any,
        modules: Sequence[torch.nn.Module],
    ) -> None:
        """A recipe's `eval_every`: score `pipe` at `step` (0: as the base model), write the report, and call
        `keep_best()` (which saves the weights into export/best/) when `step` is now the best step."""
        self.evaluate(pipe, step, base=step == 0, accelerator=accelerator, modules=modules, progress=False)
        self.write()
        if step and self.best_step == step:
            keep_best()

    def write(self) -> dict[str, Any]:
        """Write report.json and report.md into the suite's folder (atomically); returns the report."""
        report = self.report()
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.eval_dir / "report.json", json.dumps(report, indent=2) + "\n")
        write_atomic(self.eval_dir / "report.md", format_markdown(report))
        return report

    def resume(self, before_step: int) -> None:
        """Take the base entry and the checkpoints before `before_step` from an existing report of this
        suite (a resumed training run cannot draw its base model again)."""
        try:
            old = json.loads((self.eval_dir / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if old.get("suite") == self.suite.name and old.get("prompts") == self.prompts:
            self.base = old.get("base")
            self.checkpoints = [c for c in old.get("checkpoints", []) if c.get("step", 0) < before_step]


def _step(entry: dict[str, Any]) -> int:
    return int(entry["step"])


def start_training_eval(
    subject: Any, *, every: int, suite: str, clip: str, guidance: float
) -> Evaluator | None:
    """The evaluator a recipe runs every `every` steps (`eval_every`), or None when `every` is 0.

    `subject` is the recipe's `tune.personalize.Subject`, `guidance` its `sample.guidance` (a suite's
    guidance "run"). Called before the run directory exists, so a bad suite or a missing CLIP folder fails
    first; the recipe then calls `attach(run.path, step)`.
    """
    if every < 0:
        raise ConfigError(f"eval_every must be >= 0 (0 = never); got {every}")
    if every == 0:
        return None
    class_word = subject.class_word or _word_after(subject.token, subject.instance_prompt)
    return Evaluator(
        load_suite(suite).drawn_at(guidance),
        EvalSubject(subject.token, class_word, subject.photos),
        None,
        clip=clip,
    )


def _word_after(token: str, prompt: str) -> str:
    """The class word of a prompt without a concept: "a photo of sks dog" -> "dog"."""
    words = prompt.split()
    after = words.index(token) + 1 if token in words else len(words)
    return words[after] if after < len(words) else ""


def _rounded(value: Any) -> Any:
    """A score for report.json: floats (also a dict's, as subject_parts') to 6 decimals."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 6) if isinstance(value, float) else value
