"""Measuring models on the world with the judge: fresh renders, per-style attribute tables, agreement.

Used by the vae recipe (are reconstructions read like the originals?), the unet recipe (does the base
draw what the prompt says? `evaluate_generation`) and `tune eval` on the world suites.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tune.errors import ModelError
from tune.world.dataset import make_eval_prompts
from tune.world.judge import Judge, Verdict, attribute_accuracy, load_judge
from tune.world.render import render
from tune.world.spec import COLORLESS_STYLES, COLORS, STYLES, Spec, Split, sample_spec

log = logging.getLogger(__name__)

TABLE_KEYS = ("cls", "color", "pattern", "background", "style", "size", "position", "all")


def fresh_renders(
    count: int, seed: int, split: Split = "all", styles: Sequence[str] = STYLES, resolution: int = 64
) -> tuple[list[Image.Image], list[Spec]]:
    """`count` renders, styles taking turns, from a seed no training folder uses."""
    images, specs = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i, 99])
        spec = sample_spec(rng, split, style=styles[i % len(styles)])  # type: ignore[arg-type]
        images.append(render(spec, rng, resolution, resolution))
        specs.append(spec)
    return images, specs


def try_load_judge() -> Judge | None:
    """The shipped judge, or None (with a log line) when this checkout has none yet."""
    try:
        return load_judge()
    except ModelError as error:
        log.warning("no judge figures: %s", error)
        return None


def per_style(verdicts: Sequence[Verdict], specs: Sequence[Spec]) -> dict[str, dict[str, float]]:
    """Attribute accuracy for each style present, and over all ('overall')."""
    out = {}
    for style in STYLES:
        chosen = [(v, s) for v, s in zip(verdicts, specs, strict=True) if s.style == style]
        if chosen:
            out[style] = attribute_accuracy(*zip(*chosen, strict=True))
    out["overall"] = attribute_accuracy(verdicts, specs)
    return out


def agreement(judge: Judge, originals: Sequence[Image.Image], copies: Sequence[Image.Image]) -> float:
    """Share of copies (e.g. VAE reconstructions) the judge reads exactly as their originals (every
    attribute but the confidence)."""
    a, b = judge.read(list(originals)), judge.read(list(copies))
    same = [
        {k: v for k, v in x.as_dict().items() if k != "confidence"}
        == {k: v for k, v in y.as_dict().items() if k != "confidence"}
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.mean(same)) if same else float("nan")


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per style, one column per attribute (percent)."""
    lines = ["| style | " + " | ".join(TABLE_KEYS) + " |", "|---" * (len(TABLE_KEYS) + 1) + "|"]
    for style, row in table.items():
        cells = [f"{100 * row[k]:.1f}" if k in row else "-" for k in TABLE_KEYS]
        lines.append(f"| {style} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A text-to-image model on the world: draw canonical prompts, judge them
# ---------------------------------------------------------------------------------------------

BACKGROUND_TEST_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
"""The eight background colours the personalization suites and the odd-prompt test ask for."""
ODD_PROMPTS = {
    "toy": "a photo of a toy on {article} {color} background",
    "unknown_word": "a photo of zwx toy on {article} {color} background",
}
"""Partial and odd prompts: the base must still draw the background asked for."""


def draw(
    pipe,
    prompts: Sequence[str],
    seed0: int,
    steps: int,
    guidance: float,
    batch_size: int = 16,  # noqa: ANN001
) -> list[Image.Image]:
    """One image per prompt (prompt i with seed seed0 + i), with the shared sampler, `batch_size` images
    per pipeline call (one call per image took over 40 minutes for the base's 680 eval prompts)."""
    from tune.sampling import generate

    seeds = [seed0 + i for i in range(len(prompts))]
    samples = generate(
        pipe,
        list(prompts),
        seeds,
        steps=steps,
        guidance=guidance,
        batch_size=batch_size,
        paired=True,
        progress=True,
    )
    return [s.image for s in samples]


def judge_prompts(pipe, judge: Judge, prompts, seed0: int, steps: int, guidance: float):  # noqa: ANN001, ANN201
    """Draw `prompts` (EvalPrompt: text + spec) and judge them: (per-style table, images, verdicts)."""
    images = draw(pipe, [p.prompt for p in prompts], seed0, steps, guidance)
    verdicts = judge.read(images)
    return per_style(verdicts, [p.spec for p in prompts]), images, verdicts


def odd_prompts(
    pipe,  # noqa: ANN001
    judge: Judge,
    seeds: int,
    steps: int,
    guidance: float,
    seed0: int = 30_000,
) -> dict[str, float]:
    """Share of images with the right background for each of `ODD_PROMPTS` (8 colours x `seeds`)."""
    out = {}
    for name, template in ODD_PROMPTS.items():
        prompts, wanted = [], []
        for color in BACKGROUND_TEST_COLORS:
            article = "an" if color[0] in "aeiou" else "a"
            prompts += [template.format(article=article, color=color)] * seeds
            wanted += [color] * seeds
        verdicts = judge.read(draw(pipe, prompts, seed0, steps, guidance))
        out[name] = float(np.mean([v.background == w for v, w in zip(verdicts, wanted, strict=True)]))
    return out


def contact_sheet(
    images: Sequence[Image.Image],
    labels: Sequence[str],
    cols: int = 8,
    scale: int = 2,
    wrong: Sequence[bool] | None = None,
) -> Image.Image:
    """Images enlarged `scale` times with a label under each (e.g. what was asked, a newline, what the
    judge read), `cols` across; a label whose `wrong` flag is set is written in red."""
    from PIL import ImageDraw, ImageFont

    from tune.grids import fit_text

    side = images[0].width * scale
    max_lines = max(2, max(label.count("\n") + 2 for label in labels))
    text_h = 11 * max_lines + 2
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * side, rows * (side + text_h)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % cols) * side, (i // cols) * (side + text_h)
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        lines: list[str] = []
        for segment in label.split("\n"):  # each segment wrapped to the cell width
            if len(lines) < max_lines:
                lines += fit_text(draw, segment, font, side - 2, max_lines - len(lines))
        colour = (200, 0, 0) if wrong is not None and wrong[i] else (0, 0, 0)
        for k, text in enumerate(lines):
            draw.text((x + 1, y + side + 1 + 11 * k), text, fill=colour, font=font)
    return sheet


def spec_label(spec: Spec) -> str:
    """What a prompt asked for, in `verdict_label`'s words (colours left out of a sketch)."""
    shown = spec.style not in COLORLESS_STYLES
    return verdict_label(
        Verdict(
            cls=spec.cls,
            color=spec.color if shown else None,
            pattern=spec.pattern,
            color2=spec.color2 if shown else None,
            hair=spec.hair if shown else None,
            background=spec.background if shown or spec.background not in COLORS else None,
            style=spec.style,
            size=spec.size,
            position=spec.position,
            confidence=1.0,
        )
    )


def verdict_label(verdict: Verdict) -> str:
    parts = [
        verdict.style,
        verdict.size,
        verdict.color or "",
        verdict.pattern if verdict.pattern != "plain" else "",
    ]
    parts += [
        verdict.color2 or "",
        verdict.cls,
        f"h:{verdict.hair}" if verdict.hair else "",
        f"/{verdict.background}" if verdict.background else "",
    ]
    return " ".join(p for p in parts if p)


def evaluate_generation(
    pipe,  # noqa: ANN001
    judge: Judge,
    out_stem: Path,
    report: dict,
    *,
    prompts: int,
    odd_prompt_seeds: int,
    steps: int,
    guidance: float,
    draw_seed: int = 0,
) -> dict:
    """A text-to-image pipeline's final evaluation on the world: `prompts` seen-combination prompts and
    half as many held-out ones (one image each) and the odd prompts, judged. Adds the tables to `report`
    and writes `<out_stem>.json`, the tables in `<out_stem>.md` and `<out_stem>_grid.png`: the first 64
    seen-prompt images with the judge's verdict under each. `draw_seed` > 0 draws other prompts and
    noise (another sample of the same measurement, to see its spread)."""
    t0 = time.perf_counter()
    kwargs = dict(steps=steps, guidance=guidance)
    report["settings"] = {**kwargs, "scheduler": "DDIMScheduler", "draw_seed": draw_seed}
    # Fresh seeds: neither validation's (1000 + i) nor each other's.
    seen_prompts = make_eval_prompts(prompts, "train", 1 + 10 * draw_seed)
    offset = 100_000 * draw_seed
    report["seen"], images, verdicts = judge_prompts(pipe, judge, seen_prompts, 20_000 + offset, **kwargs)
    report["heldout"], *_ = judge_prompts(
        pipe, judge, make_eval_prompts(prompts // 2, "heldout", 2 + 10 * draw_seed), 10_000 + offset, **kwargs
    )
    report["odd_prompts"] = odd_prompts(pipe, judge, odd_prompt_seeds, **kwargs, seed0=30_000 + offset)
    report["eval_time_s"] = round(time.perf_counter() - t0, 1)
    out_stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    tables = [f"## seen combinations\n\n{format_table(report['seen'])}"]
    tables.append(f"## held-out combinations\n\n{format_table(report['heldout'])}")
    out_stem.with_suffix(".md").write_text(
        "\n\n".join(tables) + f"\n\nodd prompts: {report['odd_prompts']}\n"
    )
    # Asked (first line) over read (second); red where the judge read any attribute otherwise.
    asked = [p.spec for p in seen_prompts[:64]]
    labels = [f"{spec_label(s)}\n-> {verdict_label(v)}" for s, v in zip(asked, verdicts, strict=False)]
    wrong = [attribute_accuracy([v], [s])["all"] < 1 for s, v in zip(asked, verdicts, strict=False)]
    sheet = contact_sheet(images[:64], labels, scale=3, wrong=wrong)
    sheet.save(out_stem.with_name(f"{out_stem.name}_grid.png"))
    return report
