"""The dashboard's Attention page: where each word of a prompt looks while the image is drawn, tuned vs base.

Pick a model of the run (its export, a checkpoint, or the base alone), a prompt (default: the run's
trigger prompt, e.g. "a photo of sks toy") and a seed; "Draw with attention" generates the image while
recording the cross-attention maps (`tune.attention`) with the run's live models (dashboard/live.py,
the pipelines the Compare page's live panel draws with), and the base model draws the same beside it.
For each picked word (default: the trigger word) a film strip shows the image lit by the word's map
from the first denoising step (left) to the last (right), with the share of the word's final attention
mass that falls on the subject (pixels unlike the background: `tune.attention.share_on_subject`, the
figure `tune eval` reports as trigger_on_subject). Below, an Edit panel runs prompt-to-prompt editing on
the picked model (dashboard/edit_panel.py).

Torch is imported on the first draw, as for every live image.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import streamlit as st

from dashboard import edit_panel
from tune.errors import TuneError
from tune.runs import RunInfo

BASE = "base"
FINAL = "final"
_WORD = re.compile(r"<[^>]+>|[\w'-]+")  # a word, or a textual-inversion token such as <sks-toy>


def trigger_word(run: RunInfo) -> str:
    return str(run.info.get("trigger") or run.config.get("token") or "")


def trigger_prompt(run: RunInfo) -> str:
    """The run's instance prompt ("a photo of sks toy"), else a photo of its trigger word."""
    prompt = str(run.info.get("instance_prompt") or run.config.get("instance_prompt") or "")
    return prompt or (f"a photo of {trigger_word(run)}" if trigger_word(run) else "a photo")


def prompt_words(prompt: str) -> list[str]:
    """The prompt's distinct words, in order."""
    return list(dict.fromkeys(_WORD.findall(prompt)))


def model_choices(run: RunInfo) -> list[Any]:
    """FINAL (the export) when the run has one, its checkpoints (latest first), then BASE."""
    return [FINAL] * bool(run.exports) + sorted(run.checkpoint_steps, reverse=True) + [BASE]


def _model_label(choice: Any) -> str:
    if choice == FINAL:
        return "tuned (export)"
    return BASE if choice == BASE else f"tuned (step {choice})"


def _pipe(live: Any, choice: Any) -> Any:
    """The pipeline of a model choice (call under live._lock)."""
    return live.base() if choice == BASE else live.tuned(None if choice == FINAL else int(choice))


def _draw(live: Any, prompt: str, seed: int, choice: Any) -> tuple[Any, Any]:
    """(sample with its attention maps, the tokenizer of the model that drew it)."""
    from tune.sampling import generate

    with live._lock:  # the live models are shared: one image at a time (as LiveModel.generate)
        pipe = _pipe(live, choice)
        [sample] = generate(pipe, prompt, int(seed), progress=False, attention=True, **live.settings)
        return sample, pipe.tokenizer


def page_attention(run: RunInfo, name: str, *, live: Callable[[str], Any]) -> None:
    """The page; `live(run_dir)` returns the run's cached dashboard.live.LiveModel."""
    st.header(f"Attention · {name}")
    st.caption(
        "Where each word looks while the image is drawn (cross-attention maps, averaged over heads and "
        "layers): the picked model and the base model, same prompt and seed. Loads the models on first use."
    )
    choices = model_choices(run)
    c_model, c_prompt, c_seed = st.columns([2, 5, 1])
    choice = c_model.selectbox("Model", choices, format_func=_model_label, key=f"attn_model:{name}")
    prompt = c_prompt.text_input("Prompt", trigger_prompt(run), key=f"attn_prompt:{name}")
    seed = int(c_seed.number_input("Seed", value=0, step=1, key=f"attn_seed:{name}"))
    result_key = f"attn_result:{name}"
    if st.button("Draw with attention", key=f"attn_go:{name}"):
        prompt = " ".join(prompt.split()) or trigger_prompt(run)
        columns = []
        try:
            with st.spinner(f"drawing '{prompt}' (seed {seed}) with attention maps..."):
                model = live(str(run.path))
                for each in [choice, BASE] if choice != BASE else [BASE]:
                    columns.append((_model_label(each), *_draw(model, prompt, seed, each)))
            st.session_state[result_key] = (prompt, seed, columns)
        except TuneError as err:
            st.error(str(err))
    if result_key in st.session_state:
        _show(run, name, *st.session_state[result_key])
    edit_panel.panel_edit(
        name,
        " ".join(prompt.split()) or trigger_prompt(run),
        seed,
        choice,
        _model_label(choice),
        model=lambda: live(str(run.path)),
        pipe_of=_pipe,
    )


def _show(run: RunInfo, name: str, prompt: str, seed: int, columns: list[tuple[str, Any, Any]]) -> None:
    from tune.attention import share_on_subject, word_strip

    words = prompt_words(prompt)
    trigger = trigger_word(run)
    picked = st.multiselect(
        "Words",
        words,
        default=[w for w in words if w == trigger] or words[-1:],
        key=f"attn_words:{name}:{prompt}",  # a new prompt starts again from the trigger word
    )
    st.markdown(f"**{prompt}** · seed {seed}")
    for cell, (label, sample, tokenizer) in zip(st.columns(len(columns)), columns, strict=True):
        with cell:
            st.image(sample.image, caption=label, width=192)
            for word in picked:
                try:
                    strip = word_strip(sample.image, sample.attention.word_map(word, tokenizer))
                    share = share_on_subject(sample.attention, word, sample.image, tokenizer)
                except TuneError as err:
                    st.warning(str(err))
                    continue
                st.image(
                    strip,
                    caption=f"{label} · '{word}' · first step to last · "
                    f"{share:.0%} of its final attention on the subject",
                    width="stretch",
                )
