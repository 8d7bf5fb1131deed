"""Putting a personalization run's tuned weights into a base pipeline, and taking them out again.

    with apply_run_weights(pipe, "runs/toy", step=200, lora_scale=0.8) as applied:
        ...                            # pipe draws what the run's checkpoint at step 200 draws
        applied.set_lora_scale(0.5)    # lora runs: re-merge at another scale
    ...                                # pipe is the base model again, bit for bit

`step=None` is the run's export. What goes in, by recipe (file names from the run directory contract:
tune.runs, tune.lora.run_files, tune.embeddings):

    lora               the adapter (checkpoints/step_N/lora.safetensors; for the export
                       export/pytorch_lora_weights.safetensors, else the newest checkpoint's while the run
                       has not exported) merged at `lora_scale`, plus the trigger's embedding from the same
                       folder under pivotal tuning (learned_embeds.safetensors)
    textual_inversion  the embedding, learned_embeds.safetensors, of the checkpoint or export/ (an
                       SDXL file's clip_l and clip_g rows go into text_encoder and text_encoder_2)
    dreambooth         a checkpoint's accelerate state: model.safetensors (the U-Net), model_1.safetensors
                       (the text encoder, when trained; SDXL's text_encoder_2 model_2.safetensors) and the
                       EMA weights (custom_checkpoint_*.pkl), which its grids and export use; or
                       export/pipeline/'s U-Net and text encoder(s); under pivotal tuning the trigger's
                       embedding from the checkpoint (or export/) first, so the matrices fit the states

On exit every change is undone: the LoRA is unmerged (LoraStack kept the originals), a loaded U-Net or text
encoder gets its saved state back, and the tokenizers and embedding matrices are the base's again (the added
tokens gone). So `tune eval` scores one base pipeline checkpoint after checkpoint, and the dashboard keeps
one tuned pipeline and changes its step. An embedding file of another family than the base (an SDXL file
on SD1, an SD1 file on SDXL) is a one-line ModelError naming both.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tune import lora as lora_io
from tune.embeddings import EMBEDDINGS_FILE, load_embeddings
from tune.errors import ConfigError, ModelError
from tune.models.families import family_of_pipeline
from tune.runs import EXPORT_PIPELINE, RunInfo, read_run
from tune.tokens import TOWERS, pool_at_first_eos, token_ids

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

RECIPES = ("lora", "dreambooth", "textual_inversion")
"""The recipes whose runs have tuned weights to put into their base model."""
_LORA_NAME = "run"  # the run's adapter in the LoraStack
_DREAMBOOTH_MODELS = ("unet", "text_encoder", "text_encoder_2")  # in the order dreambooth prepares them


@dataclass
class AppliedWeights:
    """What `apply_run_weights` put in."""

    step: int | None
    """The checkpoint's step; None for the export."""
    files: tuple[Path, ...]
    """The files (or, for a whole exported pipeline, the folder) the weights came from."""
    stack: lora_io.LoraStack | None = None
    """The run's adapter, merged (lora runs)."""

    @property
    def lora_scale(self) -> float | None:
        """The adapter's scale (None: not a lora run)."""
        return None if self.stack is None else self.stack.scales[_LORA_NAME]

    def set_lora_scale(self, scale: float) -> None:
        """Merge the run's adapter at another scale (from the saved originals: no drift)."""
        if self.stack is None:
            raise ConfigError("only lora runs have a LoRA scale; this run's weights have none")
        if self.stack.scales[_LORA_NAME] != scale:
            self.stack.set_scale(_LORA_NAME, scale)


@contextlib.contextmanager
def apply_run_weights(
    pipe: StableDiffusionPipeline,
    run_dir: str | Path,
    step: int | None = None,
    *,
    lora_scale: float = 1.0,
) -> Iterator[AppliedWeights]:
    """Put the tuned weights of `run_dir` at checkpoint `step` (None: the export) into `pipe`, the run's
    base model, for the `with` block; see the module docstring. Inside it, `pipe.tokenizer` is a copy
    that knows the run's new tokens (if it has any)."""
    run = read_run(run_dir)
    if run.recipe not in RECIPES:
        raise ModelError(
            f"{run.path} is a {run.recipe} run; only {', '.join(RECIPES)} runs have tuned weights to apply"
        )
    with contextlib.ExitStack() as undo:  # undoes, last first, whatever was put in, also on an error
        if run.recipe == "lora":
            applied = _apply_lora(pipe, run, step, lora_scale, undo)
        elif run.recipe == "textual_inversion":
            path = _folder(run, step) / EMBEDDINGS_FILE
            _need(path, "is it a textual_inversion checkpoint?" if step is not None else _not_exported(run))
            undo.enter_context(apply_embeddings(pipe, path))
            applied = AppliedWeights(step, (path,))
        else:
            applied = _apply_dreambooth(pipe, run, step, undo)
        yield applied


# ---------------------------------------------------------------------------------------------------
# Where the files are
# ---------------------------------------------------------------------------------------------------


def _folder(run: RunInfo, step: int | None) -> Path:
    """export/, or the folder of a complete checkpoint."""
    if step is None:
        return run.export_dir
    if step not in run.checkpoint_steps:
        raise ConfigError(
            f"{run.path} has no complete checkpoint at step {step}; complete checkpoints: {_steps(run)}"
        )
    return run.checkpoint_at(step)


def _steps(run: RunInfo) -> str:
    return ", ".join(map(str, run.checkpoint_steps)) or "none"


def _not_exported(run: RunInfo) -> str:
    return f"the run has not exported yet (has it finished?); pick a checkpoint step ({_steps(run)})"


def _need(path: Path, what_to_do: str) -> None:
    if not path.exists():
        raise ModelError(f"{path.parent} has no {path.name}; {what_to_do}")


# ---------------------------------------------------------------------------------------------------
# lora and textual_inversion
# ---------------------------------------------------------------------------------------------------


def _apply_lora(
    pipe: StableDiffusionPipeline,
    run: RunInfo,
    step: int | None,
    scale: float,
    undo: contextlib.ExitStack,
) -> AppliedWeights:
    if step is None:
        adapter, step = lora_io.find_run_adapter(run.path)  # the export, else the newest checkpoint's
    else:
        adapter = _folder(run, step) / lora_io.CHECKPOINT_ADAPTER
        _need(adapter, "is it a lora run's checkpoint?")
    files = [adapter]
    embeddings = adapter.parent / EMBEDDINGS_FILE  # pivotal tuning: the trigger's embedding, same step
    if embeddings.is_file():
        undo.enter_context(apply_embeddings(pipe, embeddings))
        files.append(embeddings)
    stack = lora_io.LoraStack(pipe)
    undo.callback(stack.clear)
    stack.add(lora_io.load_lora(adapter, pipe), scale, name=_LORA_NAME)
    return AppliedWeights(step, tuple(files), stack)


@contextlib.contextmanager
def apply_embeddings(pipe: StableDiffusionPipeline, path: Path) -> Iterator[None]:
    """A learned_embeds.safetensors in the tokenizer(s) and text encoder(s) (`token`, `token_1` ... as
    diffusers' load_textual_inversion names them; an SDXL file's clip_l and clip_g rows in text_encoder and
    text_encoder_2), then the base's tokenizers and embedding matrices back."""
    embeddings = load_embeddings(path, base=family_of_pipeline(pipe))
    towers = [(t, e) for t, e in TOWERS if getattr(pipe, e, None) is not None]
    with contextlib.ExitStack() as undo:
        for (tokenizer, text_encoder), vectors in zip(towers, embeddings.vectors, strict=True):
            undo.enter_context(_tower_rows(pipe, tokenizer, text_encoder, embeddings.token, vectors, path))
        yield


@contextlib.contextmanager
def _tower_rows(
    pipe: StableDiffusionPipeline,
    tokenizer_name: str,
    encoder_name: str,
    token: str,
    vectors: torch.Tensor,
    path: Path,
) -> Iterator[None]:
    """One tokenizer/text encoder pair with the token's rows, then as it was."""
    tokenizer, text_encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
    tokens = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
    size, width = text_encoder.get_input_embeddings().weight.shape
    if vectors.shape[1] != width:
        raise ModelError(
            f"the embedding {path} has {vectors.shape[1]}-wide vectors but the base's {encoder_name} is {width} "
            "wide; it was trained on another base model"
        )
    tuned = tokenizer
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tuned = copy.deepcopy(tokenizer)  # the base's own comes back on exit, without the tokens
        tuned.add_tokens(missing)
    ids = [_id_in_prompts(tuned, t) for t in tokens]
    grown = max(ids) >= size
    kept = [i for i in ids if i < size]  # rows the matrix already had: saved, put back on exit
    saved = text_encoder.get_input_embeddings().weight.detach()[kept].clone()
    eos = pool_at_first_eos(tokenizer, text_encoder)  # as training pooled (sdxl.md section 1.1)
    try:
        setattr(pipe, tokenizer_name, tuned)
        if grown:
            # mean_resizing draws from the old rows' statistics; the new rows are set just below.
            text_encoder.resize_token_embeddings(len(tuned), mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = vectors.to(weight.device, weight.dtype)
        yield
    finally:
        if grown:  # the first `size` rows are copied back as they were
            text_encoder.resize_token_embeddings(size, mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[kept] = saved
        if eos is not None:
            text_encoder.text_model.eos_token_id = eos
        setattr(pipe, tokenizer_name, tokenizer)


def _id_in_prompts(tokenizer: Any, token: str) -> int:
    """The id a prompt's `token` gets: an added token's own, and for a word the tokenizer had (trained in
    place) the word's ("w</w>" for "w"), not the vocabulary's piece of the same spelling."""
    pieces = token_ids(tokenizer, token)
    return pieces[0] if len(pieces) == 1 else tokenizer.convert_tokens_to_ids(token)


# ---------------------------------------------------------------------------------------------------
# dreambooth
# ---------------------------------------------------------------------------------------------------


def _apply_dreambooth(
    pipe: StableDiffusionPipeline, run: RunInfo, step: int | None, undo: contextlib.ExitStack
) -> AppliedWeights:
    # Pivotal tuning: the token first, so the text encoders hold the rows the saved states have.
    embeddings = _folder(run, step) / EMBEDDINGS_FILE
    token_files = (embeddings,) if embeddings.is_file() else ()
    for path in token_files:
        undo.enter_context(apply_embeddings(pipe, path))
    if step is None:
        folder = run.export_dir / EXPORT_PIPELINE
        _need(folder / "model_index.json", _not_exported(run))
        states = [
            (getattr(pipe, name), type(getattr(pipe, name)).from_pretrained(folder / name).state_dict())
            for name in _DREAMBOOTH_MODELS
            if (folder / name).is_dir() and getattr(pipe, name, None) is not None
        ]
        undo.enter_context(_loaded(states))
        return AppliedWeights(None, (folder, *token_files))
    from accelerate.utils.constants import SAFE_MODEL_NAME
    from safetensors.torch import load_file

    folder = _folder(run, step)
    # accelerate's save_state: model.safetensors, model_1.safetensors ... in the order the models were
    # prepared (the U-Net, then the text encoder(s) when trained); custom_checkpoint_<i>.pkl the registered
    # objects' states (the data loader's, the EMA's shadow parameters).
    unet_file = folder / f"{SAFE_MODEL_NAME}.safetensors"
    _need(unet_file, "is it a dreambooth run's checkpoint?")
    files = [unet_file] + [folder / f"{SAFE_MODEL_NAME}_{i}.safetensors" for i in (1, 2)]
    parts = [
        (getattr(pipe, name), file)
        for name, file in zip(_DREAMBOOTH_MODELS, files, strict=True)
        if file.is_file() and getattr(pipe, name, None) is not None
    ]
    states = [(module, load_file(str(file))) for module, file in parts]
    ema = None
    for pkl in sorted(folder.glob("custom_checkpoint_*.pkl")):
        state = torch.load(pkl, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "shadow_params" in state:
            ema = state["shadow_params"]
    undo.enter_context(_loaded(states, ema))
    return AppliedWeights(step, (*(file for _, file in parts), *token_files))


@contextlib.contextmanager
def _loaded(states: list[tuple[Any, dict[str, Any]]], ema: list[Any] | None = None) -> Iterator[None]:
    """Each module with a state dict loaded (then the EMA weights, which replace the U-Net's: the first
    module's parameters), and its own state back on exit."""
    # Kept on the CPU: a whole U-Net's copy would double its GPU memory.
    saved = [(m, {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}) for m, _ in states]
    try:
        for module, state in states:
            module.load_state_dict(state)
        if ema is not None:
            with torch.no_grad():
                for param, value in zip(states[0][0].parameters(), ema, strict=True):
                    param.copy_(value)
        yield
    finally:
        for module, state in saved:
            module.load_state_dict(state)
