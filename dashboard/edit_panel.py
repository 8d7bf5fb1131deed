"""The Attention page's Edit panel: prompt-to-prompt editing (`tune.editing.edit`) live on the picked model.

Prompt A is drawn, then prompt B from the same seed with A's cross-attention maps for B's first K steps
(a word swap when B has as many tokens as A, a refinement when B adds words), optionally with words of B
re-weighted ("red=2, ball=0.5"); A and B are shown side by side, as `tune sample --prompt A --edit B`
writes them. Same models, lock and sampler settings as the page's maps (dashboard/live.py).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from tune.errors import TuneError


def parse_reweights(text: str) -> dict[str, float]:
    """'red=2, ball=0.5' -> {'red': 2.0, 'ball': 0.5} (empty text: none), as --reweight takes them."""
    from tune.editing import parse_reweight

    return dict(parse_reweight(part) for part in text.replace(",", " ").split())


def _edit(live: Any, pipe_of: Any, choice: Any, prompt_a: str, prompt_b: str, seed: int, **kw: Any) -> Any:
    from tune.editing import edit

    with live._lock:  # the live models are shared: one image at a time (as LiveModel.generate)
        pipe = pipe_of(live, choice)
        return edit(pipe, prompt_a, prompt_b, seed, **kw)


def panel_edit(
    name: str, prompt: str, seed: int, choice: Any, label: str, *, model: Any, pipe_of: Any
) -> None:
    """The panel under the page's maps. `model()` returns the run's LiveModel, `pipe_of(live, choice)`
    the pipeline of the page's picked model (`choice`, shown as `label`)."""
    st.subheader("Edit (prompt-to-prompt)")
    st.caption(
        "Draws prompt A, then B from the same seed reusing A's cross-attention maps for B's first steps: "
        "B keeps A's layout and changes what the edited words cover. Swap words for words of the same "
        "token count, or add words to A."
    )
    c_a, c_b = st.columns(2)
    prompt_a = c_a.text_input("Prompt A", prompt, key=f"edit_a:{name}")
    prompt_b = c_b.text_input("Prompt B (the edit)", prompt, key=f"edit_b:{name}")
    c_k, c_w = st.columns([2, 3])
    edit_k = c_k.number_input(
        "Edited steps K (empty: 40% of the steps)", min_value=0, value=None, step=1, key=f"edit_k:{name}"
    )
    weights = c_w.text_input("Re-weight words of B (WORD=FACTOR, ...)", "", key=f"edit_w:{name}")
    result_key = f"edit_result:{name}"
    if st.button("Edit", key=f"edit_go:{name}"):
        try:
            live = model()
            settings = {key: v for key, v in live.settings.items() if key != "batch_size"}
            with st.spinner(f"drawing '{prompt_a}' and its edit (seed {seed})..."):
                result = _edit(
                    live,
                    pipe_of,
                    choice,
                    " ".join(prompt_a.split()),
                    " ".join(prompt_b.split()),
                    seed,
                    edit_steps=None if edit_k is None else int(edit_k),
                    reweight=parse_reweights(weights),
                    **settings,
                )
            st.session_state[result_key] = (label, result)
        except TuneError as err:
            st.session_state.pop(result_key, None)
            st.error(str(err))
    if result_key in st.session_state:
        shown_label, result = st.session_state[result_key]
        st.image(
            result.side_by_side(),
            caption=f"{shown_label} · {result.plan.mode} for {result.edit_steps} of {result.steps} steps"
            + (" · local blend" if result.blended else ""),
            width="stretch",
        )
