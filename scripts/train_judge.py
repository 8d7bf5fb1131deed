"""Train the world judge (`tune.world.judge`) on renders and ship it to models/world-judge.

    python scripts/train_judge.py                      # render, train, measure, write models/world-judge
    python scripts/train_judge.py --steps 300 --count 4000 --out /tmp/judge   # a quick one

Renders `--count` pictures of the whole world (every split, the example subjects' looks included: the
judge may see everything), trains JudgeNet with blur, resampling, noise and brightness augmentations,
then measures it on fresh renders (`--eval-per-style` per style) clean and blurred, and writes
`model.safetensors` (fp16), `config.json` and `report.json` to `--out`. The report also holds, for
each example subject, how often the judge finds it in fresh photos of it (new seeds, JPEG as shipped)
and in renders of its look-alikes (one colour, the pattern, the hair or the class changed);
`--subjects-only` measures just that for the judge already in `--out`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tune.world.judge import (
    HEADS,
    Judge,
    JudgeNet,
    attribute_accuracy,
    judge_loss,
    judge_tensor_labels,
    load_judge,
)
from tune.world.render import render
from tune.world.spec import HELDOUT_LOOKS, STYLES, Spec, allowed, sample_spec
from tune.world.subjects import JPEG_QUALITY, SUBJECTS, look_alikes, render_photo

ROOT = Path(__file__).resolve().parent.parent


def judge_spec(rng: np.random.Generator, style: str | None = None) -> Spec:
    """Any spec of the world; one in eight takes the look of an example subject (or a near miss of one:
    a single attribute changed), so the judge sees them and their look-alikes often."""
    spec = sample_spec(rng, "all", style=style)  # type: ignore[arg-type]
    if rng.random() < 0.125:
        cls, color, pattern, color2, hair = HELDOUT_LOOKS[int(rng.integers(len(HELDOUT_LOOKS)))]
        field = ["color", "color2", "hair" if hair else "pattern"][int(rng.integers(3))]
        other = [c for c in ("plain", "spotted", "striped") if c != pattern]
        value = other[int(rng.integers(2))] if field == "pattern" else sample_spec(rng, "all").color
        try:
            look = replace(spec, cls=cls, color=color, pattern=pattern, color2=color2, hair=hair)  # type: ignore[arg-type]
            if rng.random() < 0.5:  # a look-alike: one attribute changed
                if field == "pattern" and value == "plain":
                    look = replace(look, pattern="plain", color2=None)
                else:
                    look = replace(look, **{field: value})  # type: ignore[arg-type]
            if allowed(look):
                spec = look
        except ValueError:  # the changed attribute made an impossible spec: keep the plain draw
            pass
    return spec


def _render_chunk(job: tuple[int, int, int, str | None]) -> tuple[np.ndarray, list[Spec]]:
    seed, start, stop, style = job
    pixels, specs = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        spec = judge_spec(rng, style)
        pixels.append(np.asarray(render(spec, rng), dtype=np.uint8))
        specs.append(spec)
    return np.stack(pixels), specs


def render_set(
    count: int, seed: int, workers: int, style: str | None = None
) -> tuple[np.ndarray, list[Spec]]:
    chunk = 250
    jobs = [(seed, s, min(count, s + chunk), style) for s in range(0, count, chunk)]
    pixels, specs = [], []
    with ProcessPoolExecutor(workers) as pool, tqdm(total=count, desc="rendering", unit="img") as bar:
        for p, s in pool.map(_render_chunk, jobs):
            pixels.append(p)
            specs += s
            bar.update(len(s))
    return np.concatenate(pixels), specs


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma [B] in pixels; 0 leaves an image as it is)."""
    b, c, h, w = x.shape
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    kernel = (k[:, :, None] * k[:, None, :]).repeat_interleave(c, 0)[:, None]
    out = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="replicate"), kernel, groups=b * c)
    return out.reshape(b, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What VAE round trips and sampling do to a picture: blur, resampling, noise, small colour drift."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    gain = 1 + (u(b, 1, 1, 1) - 0.5) * 0.16 + (u(b, 3, 1, 1) - 0.5) * 0.06
    x = x * gain + (u(b, 1, 1, 1) - 0.5) * 0.08
    sigma = torch.where(u(b) < 0.55, u(b) * 1.3, torch.zeros(b))
    x = gaussian_blur(x, sigma)
    small = u(b) < 0.25
    if small.any():
        side = int(24 + u(1).item() * 24)
        down = F.interpolate(
            x[small], size=(side, side), mode="bilinear", antialias=True, align_corners=False
        )
        x[small] = F.interpolate(down, size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * (u(b, 1, 1, 1) * 0.035)
    return x.clamp(0, 1)


def evaluate(judge: Judge, per_style: int, seed: int, workers: int, blur_sigma: float = 0.0) -> dict:
    report = {}
    for style in STYLES:
        pixels, specs = render_set(per_style, seed, workers, style)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        if blur_sigma:
            images = gaussian_blur(images, torch.full((len(images),), blur_sigma))
        arrays = [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in images]
        report[style] = attribute_accuracy(judge.read(arrays), specs)
    return report


def subject_figures(judge: Judge, photos: int, seed: int) -> dict:
    """Per example subject: found in `photos` fresh JPEG photos of it, and in look-alike renders (four
    jitters of each, two image sizes)."""
    out = {}
    for name, subject in SUBJECTS.items():
        images = []
        for i in range(photos):
            buffer = io.BytesIO()
            render_photo(subject, i, seed).save(buffer, "JPEG", quality=JPEG_QUALITY)
            images.append(Image.open(buffer).convert("RGB"))
        found = sum(subject.found(v) for v in judge.read(images))
        alikes = [
            render(spec, np.random.default_rng([seed, i, j]), *((64, 64) if j % 2 else (128, 96)))
            for i, spec in enumerate(look_alikes(subject))
            for j in range(4)
        ]
        false = sum(subject.found(v) for v in judge.read(alikes))
        out[name] = {
            "photos": photos,
            "found_in_photos": found / photos,
            "look_alikes": len(alikes),
            "found_in_look_alikes": false / len(alikes),
        }
    return out


def measure(judge: Judge, args: argparse.Namespace, per_style: bool = True) -> dict:
    """The report's figures: accuracy per style on fresh renders, clean and after a 1 px blur (unless
    `per_style` is False), and the example subjects; each on renders of its own seed."""
    figures = {}
    if per_style:
        figures["clean"] = evaluate(judge, args.eval_per_style, 5000 + args.seed, args.workers)
        figures["blur_1px"] = evaluate(
            judge, args.eval_per_style, 6000 + args.seed, args.workers, blur_sigma=1.0
        )
    figures["subjects"] = subject_figures(judge, args.subject_photos, 7000 + args.seed)
    return figures


def write_card(folder: Path, report: dict, command: str) -> None:
    """MODEL_CARD.md from report.json: how it was made and every measured figure."""
    lines = [
        "# world judge",
        "",
        "Reads class, colours, pattern, hair, background, style, size and position from a picture of the toy",
        "world (`tune.world.judge.load_judge`). Made by `scripts/train_judge.py` (`make judge`); the last",
        f"command: `{command}`.",
        f"{report.get('params', '?')} parameters; {report.get('count', '?')} training renders, "
        f"{report.get('steps', '?')} steps of {report.get('batch_size', '?')}"
        + (f", fine-tuned from {report['init']}" if report.get("init") else "")
        + f"; training {report.get('train_s', '?')} s.",
    ]
    for kind, title in (
        ("clean", "fresh renders"),
        ("blur_1px", "the same kind of renders after a 1 px blur"),
    ):
        if kind not in report:
            continue
        attributes = list(report[kind]["photo"])  # photos show every attribute
        lines += ["", f"## Accuracy on {title} (per style)", ""]
        lines += ["| style | " + " | ".join(attributes) + " |", "|---" * (len(attributes) + 1) + "|"]
        for style, acc in report[kind].items():
            lines.append(
                f"| {style} | " + " | ".join(f"{acc[a]:.3f}" if a in acc else "-" for a in attributes) + " |"
            )
    if "subjects" in report:
        lines += ["", "## Example subjects", "", "| subject | found in fresh photos | found in look-alikes |"]
        lines.append("|---|---|---|")
        for name, f in report["subjects"].items():
            lines.append(
                f"| {name} | {f['found_in_photos']:.3f} of {f['photos']} | "
                f"{f['found_in_look_alikes']:.3f} of {f['look_alikes']} |"
            )
    (folder / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=48_000, help="training renders")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--pooling", choices=("mean", "attention"), default="attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--eval-per-style", type=int, default=2000)
    parser.add_argument(
        "--cache",
        type=Path,
        nargs="+",
        default=[ROOT / "data" / "judge-train.npz"],
        help="training renders (.npz); one is rendered when missing, several are concatenated",
    )
    parser.add_argument("--style", choices=STYLES, help="render the --cache file in this style only")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "world-judge")
    parser.add_argument("--render-only", action="store_true", help="write the --cache file and stop")
    parser.add_argument(
        "--init", type=Path, help="start from this judge's weights (fine-tune after a renderer change)"
    )
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--subject-photos", type=int, default=200, help="fresh photos per example subject")
    parser.add_argument(
        "--subjects-only", action="store_true", help="measure the judge in --out on the subjects; no training"
    )
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="measure the judge in --out again (per style, blurred, subjects); no training",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.subjects_only or args.measure_only:
        report_path = args.out / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        report |= measure(load_judge(args.out), args, per_style=args.measure_only)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        write_card(args.out, report, report.get("command", "python scripts/train_judge.py"))
        print(json.dumps({k: report[k] for k in ("clean", "blur_1px", "subjects") if k in report}, indent=2))
        return 0
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    # Several caches: a mixture rendered before (e.g. one style given more weight), only read.
    missing = [str(c) for c in args.cache if not c.is_file()]
    if len(args.cache) > 1 and missing:
        parser.error(f"several --cache files are only read, and these are missing: {', '.join(missing)}")
    parts = []
    for cache in [] if missing else args.cache:
        data = np.load(cache, allow_pickle=True)  # an npz reads an array each time it is indexed: once here
        parts.append((data["pixels"], list(data["specs"])))
    if len(parts) == 1 and len(parts[0][0]) != args.count:  # one cache of another size: render it again
        parts = []
    if parts:
        pixels, specs = np.concatenate([p for p, _ in parts]), [s for _, ss in parts for s in ss]
    else:
        pixels, specs = render_set(args.count, 1000 + args.seed, args.workers, args.style)
        args.cache[0].parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.cache[0], pixels=pixels, specs=np.array(specs, dtype=object))
    render_s = time.perf_counter() - t0
    if args.render_only:
        return 0
    targets = judge_tensor_labels(specs)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # uint8

    net = JudgeNet(args.width, pooling=args.pooling)
    if args.init:  # tensors of the same name and shape (a new pooling head starts fresh)
        own = net.state_dict()
        init = {k: v.float() for k, v in load_file(str(args.init / "model.safetensors")).items()}
        kept = {k: v for k, v in init.items() if k in own and own[k].shape == v.shape}
        net.load_state_dict(kept, strict=False)
        print(
            f"init from {args.init}: {len(kept)} of {len(own)} tensors; new: {sorted(set(own) - set(kept))}"
        )
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.02)
    warmup = args.warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    g = torch.Generator().manual_seed(args.seed)
    t1 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="judge", unit="step")
    for step in bar:
        index = torch.randint(len(images), (args.batch_size,), generator=g)
        x = augment(images[index].float() / 255, g)
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(-1)
            flip = True
        else:
            flip = False
        batch_targets = {k: v[index] for k, v in targets.items()}
        if flip:  # a mirrored picture has its object in the mirrored corner
            swap = {0: 0, 1: 2, 2: 1, 3: 4, 4: 3}
            pos = batch_targets["position"]
            batch_targets["position"] = torch.tensor([swap[int(p)] for p in pos])
        loss = judge_loss(net(x), batch_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - t1

    judge = Judge(net.eval())
    report = {
        "count": args.count,
        "init": str(args.init) if args.init else None,
        "command": "python scripts/train_judge.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
        "params": sum(p.numel() for p in net.parameters()),
        **measure(judge, args),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.half().contiguous() for k, v in net.state_dict().items() if v.is_floating_point()}
        | {k: v for k, v in net.state_dict().items() if not v.is_floating_point()},
        str(args.out / "model.safetensors"),
    )
    (args.out / "config.json").write_text(
        json.dumps({"width": args.width, "pooling": args.pooling, "heads": HEADS}, indent=2) + "\n"
    )
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_card(args.out, report, report["command"])
    for kind in ("clean", "blur_1px"):
        for style, acc in report[kind].items():
            print(kind, style, " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
