"""The tune dashboard: runs, base vs tuned side by side, trajectories, exports.

    tune dashboard [--runs DIR] [--port N]          (or: TUNE_RUNS_DIR=DIR streamlit run dashboard/app.py)

Pages (sidebar; also `?page=compare&run=NAME` in the URL):
    Runs        every run under the folder: recipe, base model, concept, status, steps, time, loss curve
                (training loss and, with val_every, the held-out photos' val_loss)
    Compare     rows = prompts (x seeds), columns = base (step 0) and checkpoints; filters for prompt,
                style, seed and columns; concept photos beside the grid; eval figures per checkpoint (of
                the suite picked, when `tune eval` ran several);
                live base vs tuned images of any prompt, with a LoRA scale slider
    Trajectory  the denoising film strip of one sample (saved, or generated live)
    Export      the run's export/*.safetensors: summary, metadata, download (dashboard/export_page.py)
    Attention   where each word of a prompt looks, tuned vs base, and prompt-to-prompt edits
                (dashboard/attention_page.py, dashboard/edit_panel.py)

Browsing reads run directories only (dashboard/data.py); torch is imported the first time the user
asks for a live image (dashboard/live.py), and the loaded pipelines are cached for the session.
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path
from typing import Any

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the checkout that holds it.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from dashboard import attention_page, data, eval_reports, export_page  # noqa: E402
from tune.errors import TuneError  # noqa: E402
from tune.runs import RunInfo  # noqa: E402

PAGES = ("Runs", "Compare", "Trajectory", "Export", "Attention")
# Tiny sample images (32-64 px) shown large: keep their pixels sharp instead of blurring them.
_CSS = "<style>img { image-rendering: pixelated; }</style>"


# ---------------------------------------------------------------------------------------------
# Cached readers
# ---------------------------------------------------------------------------------------------


@st.cache_data(ttl=5, show_spinner=False)
def _runs(root: str) -> list[RunInfo]:
    return data.load_runs(root)


@st.cache_resource(show_spinner=False)
def _live_model(run_dir: str) -> Any:
    from dashboard.live import LiveModel  # the first torch import of the session

    return LiveModel(run_dir)


def _generate(run: RunInfo, prompt: str, seed: int, **kwargs: Any) -> Any:
    """A live image, or None after showing why it could not be made."""
    try:
        with st.spinner(f"generating '{prompt}' (seed {seed})..."):
            return _live_model(str(run.path)).generate(prompt, seed, **kwargs)
    except TuneError as err:
        st.error(str(err))
    return None


# ---------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------


def page_runs(runs: list[RunInfo], root: Path) -> None:
    st.header("Runs")
    st.caption(f"{len(runs)} runs under {root}")
    st.dataframe([data.run_row(r, root) for r in runs], hide_index=True, width="stretch")
    for run in runs:
        row = data.run_row(run, root)
        title = f"{row['run']} · {row['recipe']} · {row['status']} · steps {row['steps'] or '-'}"
        with st.expander(title, expanded=len(runs) <= 3):
            points = data.loss_points(run)
            if points:
                _loss_chart(points)
            else:
                st.caption("no loss logged yet")


def _loss_chart(points: list[dict[str, Any]]) -> None:
    """The training loss with, when the run logs it, the validation loss beside it (marked points: it is
    logged every val_every steps)."""
    import altair as alt
    import pandas as pd

    lines = (
        alt.Chart(pd.DataFrame(points))
        .mark_line()
        .encode(x=alt.X("step:Q"), y=alt.Y("value:Q", title="loss"), color=alt.Color("metric:N", title=None))
    )
    dots = lines.mark_point(filled=True).transform_filter(alt.datum.metric != "loss")
    st.altair_chart((lines + dots).properties(height=220), width="stretch")


def page_compare(run: RunInfo, name: str) -> None:
    st.header(f"Compare · {name}")
    suites = eval_reports.eval_suites(run)  # each `tune eval --suite` keeps its report; pick one when several
    if len(suites) > 1:
        suites = [st.selectbox("Eval suite", suites, key=f"eval_suite:{name}")]
    report = eval_reports.read_eval_report(run, suites[0]) if suites else None
    sets = data.sample_sets(run)
    styles: dict[str, str] = {}
    if report is not None:
        eval_sets = eval_reports.eval_sample_sets(run, report)
        if eval_sets:
            source = st.radio(
                "Images", ["validation samples", "eval suite"], horizontal=True, key=f"source:{name}"
            )
            if source == "eval suite":
                sets, styles = eval_sets, eval_reports.eval_styles(report)
    if not sets:
        st.info(f"{name} has no samples yet (samples/step_XXXXXX/ appear as the run trains).")
    else:
        _compare_grid(run, name, sets, styles)
    if report is not None:
        _eval_figures(report)
    _live_panel(run, name, sets)


def _compare_grid(run: RunInfo, name: str, sets: dict[int, data.SampleSet], styles: dict[str, str]) -> None:
    rows = data.compare_rows(sets, data.subject_phrases(run), styles)
    steps = sorted(sets)
    all_styles = list(dict.fromkeys(r.style for r in rows))
    all_seeds = sorted({r.seed for r in rows})
    f_text, f_style, f_seed, f_cols = st.columns([2, 3, 2, 3])
    text = f_text.text_input("Prompt contains", key=f"f_text:{name}")
    chosen_styles = f_style.multiselect("Style", all_styles, default=all_styles, key=f"f_style:{name}")
    chosen_seeds = f_seed.multiselect("Seeds", all_seeds, default=all_seeds, key=f"f_seed:{name}")
    columns = f_cols.multiselect(
        "Columns",
        steps,
        default=data.default_columns(steps),
        format_func=data.column_label,
        key=f"f_cols:{name}",
    )
    columns = sorted(columns)
    shown = data.filter_rows(rows, text, chosen_styles, chosen_seeds)
    width = st.session_state.get("image_width", 160)
    photos = data.concept_photos(run)
    grid, side = st.columns([5, 1]) if photos else (st.container(), None)
    with grid:
        if not shown or not columns:
            st.info("No images match the filters.")
        else:
            shown_images = sum(1 for r in shown for step in columns if step in r.cells)
            st.caption(f"{shown_images} images · {len(shown)} rows (prompt x seed) · {len(columns)} columns")
            for cell, step in zip(st.columns(len(columns)), columns, strict=True):
                cell.markdown(f"**{data.column_label(step)}**")
            for prompt, group in itertools.groupby(shown, key=lambda r: r.prompt):
                group = list(group)
                st.markdown(f"**{prompt}** · _{group[0].style}_")
                for row in group:
                    for cell, step in zip(st.columns(len(columns)), columns, strict=True):
                        image = row.cells.get(step)
                        if image is None:
                            cell.caption("(no image)")
                        else:
                            cell.image(str(image.path), caption=f"seed {row.seed}", width=width)
    if side is not None:
        with side:
            st.markdown(f"**Concept photos** ({len(photos)})")
            st.image([str(p) for p in photos], width=min(width, 96), caption=[p.name for p in photos])


def _eval_figures(report: dict[str, Any]) -> None:
    import altair as alt
    import pandas as pd

    st.subheader("Eval")
    table = eval_reports.eval_table(report)
    best = report.get("best_step")
    st.caption(
        f"suite {report.get('suite', '?')} · CLIP {report.get('clip_model', '?')} · "
        f"best step: {best if best is not None else 'none'}"
    )
    if report.get("overfit"):
        st.warning(f"overfit: {report.get('overfit_reason') or 'later checkpoints score worse'}")
    scores = [
        k for k in ("subject_fidelity", "prompt_fidelity", "trigger_on_subject") if any(k in r for r in table)
    ]
    if table and scores:
        long = pd.DataFrame(
            [{"step": r["step"], "score": k, "value": r[k]} for r in table for k in scores if k in r]
        )
        lines = (
            alt.Chart(long)
            .mark_line(point=True)
            .encode(x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title="score"), color="score:N")
        )
        chart = lines
        if best is not None:
            rule = pd.DataFrame({"step": [best], "label": [f"best step {best}"]})
            marker = alt.Chart(rule).mark_rule(color="green", strokeDash=[4, 4]).encode(x="step:Q")
            label = (
                alt.Chart(rule)
                .mark_text(align="left", dx=4, dy=-120, color="green")
                .encode(x="step:Q", text="label:N")
            )
            chart = lines + marker + label
        st.altair_chart(chart, width="stretch")
    st.dataframe(table, hide_index=True, width="stretch")


def _live_panel(run: RunInfo, name: str, sets: dict[int, data.SampleSet]) -> None:
    st.subheader("Generate live")
    st.caption("Base vs tuned, same seed; loads the models (torch) on first use.")
    prompts = list(dict.fromkeys(im.prompt for s in sets.values() for im in s.images)) or ["a photo"]
    seeds = sorted({im.seed for s in sets.values() for im in s.images}) or [0]
    c_prompt, c_seed, c_scale = st.columns([4, 1, 2])
    chosen = c_prompt.selectbox("Prompt", prompts, key=f"live_prompt:{name}")
    new = c_prompt.text_input("... or a new prompt", key=f"live_new:{name}")
    seed = int(c_seed.number_input("Seed", value=seeds[0], step=1, key=f"live_seed:{name}"))
    scale = 1.0
    request_key = f"live_request:{name}"
    if run.recipe == "lora":
        # Moving the slider is itself the request: the selected prompt is drawn again at that scale.
        scale = c_scale.slider(
            "LoRA scale",
            0.0,
            2.0,
            1.0,
            0.05,
            key=f"live_scale:{name}",
            on_change=st.session_state.__setitem__,
            args=(request_key, True),
        )
    if st.button("Generate base vs tuned", key=f"live_go:{name}"):
        st.session_state[request_key] = True
    result_key = f"live_result:{name}"
    if st.session_state.pop(request_key, False):
        prompt = new.strip() or chosen
        base = _generate(run, prompt, seed, tuned=False)
        tuned = _generate(run, prompt, seed, tuned=True, scale=scale) if base is not None else None
        if base is not None and tuned is not None:
            st.session_state[result_key] = (prompt, seed, scale, base.image, tuned.image)
    if result_key in st.session_state:
        prompt, seed, scale, base_image, tuned_image = st.session_state[result_key]
        st.markdown(
            f"**{prompt}** · seed {seed}" + (f" · LoRA scale {scale:g}" if run.recipe == "lora" else "")
        )
        left, right = st.columns(2)
        left.image(base_image, caption="base", width=256)
        right.image(tuned_image, caption="tuned", width=256)


def page_trajectory(run: RunInfo, name: str) -> None:
    st.header(f"Trajectory · {name}")
    sets = data.sample_sets(run)
    if not sets:
        st.info(f"{name} has no samples yet.")
        return
    c_step, c_prompt, c_seed = st.columns([1, 4, 1])
    step = c_step.selectbox("Step", sorted(sets), format_func=data.column_label, key=f"t_step:{name}")
    images = sets[step].images
    prompt = c_prompt.selectbox(
        "Prompt", list(dict.fromkeys(im.prompt for im in images)), key=f"t_prompt:{name}"
    )
    seed = c_seed.selectbox(
        "Seed", sorted({im.seed for im in images if im.prompt == prompt}), key=f"t_seed:{name}"
    )
    image = next(im for im in images if im.prompt == prompt and im.seed == seed)
    strip = data.trajectory_of(image)
    left, right = st.columns([1, 5])
    left.image(str(image.path), caption="final image", width=128)
    if strip is not None:
        right.image(str(strip), caption="denoising, left (noise) to right (image): the predicted clean image")
        return
    right.info("This sample has no saved film strip (sample_grid writes one with trajectory_every > 0).")
    steps = int(sets[step].settings.get("steps") or 25)
    every = st.number_input(
        "Frame every K denoising steps", 1, steps, max(1, steps // 8), key=f"t_every:{name}"
    )
    if st.button("Generate film strip live", key=f"t_go:{name}"):
        checkpoint = step if step in run.checkpoint_steps else None
        sample = _generate(run, prompt, seed, tuned=step != 0, step=checkpoint, trajectory_every=int(every))
        if sample is not None:
            st.session_state[f"t_result:{name}"] = (step, prompt, seed, sample.film_strip())
    result = st.session_state.get(f"t_result:{name}")
    if result is not None and result[:3] == (step, prompt, seed) and result[3] is not None:
        st.image(result[3], caption="generated live: noise (left) to image (right)")


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="tune dashboard", layout="wide")
    st.markdown(_CSS, unsafe_allow_html=True)
    root = data.runs_dir()
    params = st.query_params
    asked_page = str(params.get("page", "")).capitalize()
    page = st.sidebar.radio(
        "Page", PAGES, index=PAGES.index(asked_page) if asked_page in PAGES else 0, key="page"
    )
    st.sidebar.slider("Image width", 48, 512, 160, 16, key="image_width")
    if not root.is_dir():
        st.warning(
            f"No runs folder at {root}: start a run (`tune run lora --config default`) or pass --runs DIR."
        )
        return
    runs = _runs(str(root))
    if not runs:
        st.info(f"No runs under {root} yet: `tune run lora --config default concept=concepts/sks-toy`.")
        return
    params["page"] = page.lower()
    if page == "Runs":
        page_runs(runs, root)
        return
    names = [data.run_name(r, root) for r in runs]
    with_samples = [n for n, r in zip(names, runs, strict=True) if r.sample_steps]
    asked_run = str(params.get("run", ""))
    default = asked_run if asked_run in names else (with_samples or names)[0]
    name = st.sidebar.selectbox("Run", names, index=names.index(default), key="run")
    params["run"] = name
    run = runs[names.index(name)]
    st.sidebar.caption(f"{run.recipe} · {run.status} · {data.base_model(run) or 'base model ?'}")
    pages = {
        "Compare": page_compare,
        "Trajectory": page_trajectory,
        "Export": export_page.page_export,
        "Attention": functools.partial(attention_page.page_attention, live=_live_model),
    }
    pages[page](run, name)


main()
