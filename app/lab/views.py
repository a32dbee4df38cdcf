"""The training lab's page sections: the knob panel, progress text, the live charts (loss, MaxVio, expert-load and
bias heatmaps), the results of a finished run, the comparison of runs, share links, the preview of the model and
schedule before a run, and the sidebar status shown on every other page while a run trains.
"""
from __future__ import annotations

import collections
import math
import threading

import pandas as pd
import streamlit as st

from app import state, ui
from app.lab import charts as ct
from app.lab import records as rec
from app.lab.knobs import KNOBS, code_span
from app.lab.manager import STATUS_TEXT, LabRun
from app.lab import session
from app.lab.session import current, history
from app.lab.worker import DEFAULT_PROMPT
from core.published import V3_MTP_ACCEPTANCE

POLL_S = 1.0           # owner's live view refresh (the first point comes with the Start response itself)
WATCH_POLL_S = 2.0     # a watcher's (or a joined tab's) refresh: cheaper, many of them share the server
SIDEBAR_POLL_S = 2.0   # heartbeat + progress in the sidebar on other pages


def knob_panel(container=None) -> dict:
    """Draw the lab's knobs (URL-bound) in the sidebar; returns {key: value}."""
    sb = container or st.sidebar
    sb.subheader("Training lab knobs")
    vals: dict = {}

    def draw(key, **kw):
        kn = KNOBS[key]
        common = dict(help=kn.help, **kw)
        if kn.kind == "toggle":
            vals[key] = state.toggle(kn.label, key, kn.default, **common)
        elif kn.kind == "text":
            vals[key] = st.text_input(kn.label, kn.default, key=key, bind="query-params", **common) or ""
        elif kn.kind == "radio":
            vals[key] = state.radio(kn.label, key, kn.options, kn.default, fmt=kn.fmt, **common)
        elif kn.kind == "selectbox":
            vals[key] = state.selectbox(kn.label, key, kn.options, kn.default, fmt=kn.fmt, **common)
        else:
            vals[key] = state.select_slider(kn.label, key, kn.options, kn.default, fmt=kn.fmt, **common)

    with sb.expander("Model", expanded=True, icon=":material/architecture:"):
        draw("tr_attn")
        draw("tr_ffn")
        dense = st.session_state.get("tr_ffn", "moe") == "dense"
        draw("tr_experts", disabled=dense)
        draw("tr_topk", disabled=dense)
        draw("tr_prec")
        draw("tr_fp8sw", disabled=vals["tr_prec"] in ("fp32", "bf16"))
        draw("tr_mtp")
    with sb.expander("Load balancing", expanded=True, icon=":material/balance:"):
        draw("tr_bal", disabled=dense, horizontal=False)
        draw("tr_gamma", disabled=dense or vals["tr_bal"] not in ("aux_free", "both"))
        draw("tr_alpha", disabled=dense or vals["tr_bal"] not in ("aux_loss", "both"))
    with sb.expander("Data and schedule", expanded=True, icon=":material/schedule:"):
        draw("tr_data")
        draw("tr_steps")
        draw("tr_lr")
        draw("tr_batch")
        draw("tr_seq")
        draw("tr_prompt", placeholder=f"default: {DEFAULT_PROMPT[vals['tr_data']]!r}")
    return vals



# ====================================================================== rendering
def fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "…"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def progress_text(run: LabRun) -> tuple[float, str]:
    p = run.progress()
    frac = p["step"] / max(1, p["total"])
    bits = [f"Step {p['step']} / {p['total']}"]
    if p["tokens_per_s"]:
        bits.append(f"{p['tokens_per_s']:,.0f} tokens/s")
    bits.append(f"{fmt_s(p['elapsed'])} elapsed")
    if run.active:
        bits.append(f"~{fmt_s(p['left'])} left" if p["left"] is not None else "starting…")
    return min(1.0, frac), " · ".join(bits)


def layer_choice(run: LabRun | None) -> int | None:
    """The MoE layer shown in the heatmaps (None = mean over layers); a view knob bound to ?tr_layer=."""
    n = rec.n_moe_layers(run.records) if run is not None else 0
    n = n or 3
    opts = ["mean"] + [str(i + 1) for i in range(n)]
    v = state.radio("Heatmaps show MoE layer", "tr_layer", opts, "mean",
                    help="The expert-load and bias heatmaps: one MoE layer, or the mean over all of them.")
    return None if v == "mean" else int(v) - 1


def _layer_label(layer: int | None, run: LabRun) -> str:
    if layer is None:
        return "mean over the MoE layers"
    fk = getattr(run.model_cfg, "first_k_dense_replace", 1)
    return f"MoE layer {layer + 1} (model layer {layer + fk})"


CELL_W = 430  # px: two charts side by side on a wide screen, one per row on a narrow one (the row wraps)


def grid():
    """A row of chart cells that wraps on narrow screens: `with grid(): with cell(): ...`."""
    return st.container(horizontal=True, gap="medium")


def cell():
    return st.container(width=CELL_W)


_FIGS: "collections.OrderedDict[tuple, dict]" = collections.OrderedDict()
_FIGS_LOCK = threading.Lock()
FIG_CACHE_SIZE = 64  # figures shared by every session: a run's live charts per record count, knobs' previews


def _shared(key: tuple, build):
    """`build()` once per server for `key`, then the same objects for every session (a small LRU). Plotly figures
    built here are only read afterwards: st.plotly_chart serialises a copy."""
    with _FIGS_LOCK:
        if key in _FIGS:
            _FIGS.move_to_end(key)
            return _FIGS[key]
    value = build()
    with _FIGS_LOCK:
        _FIGS[key] = value
        while len(_FIGS) > FIG_CACHE_SIZE:
            _FIGS.popitem(last=False)
    return value


def _heat(run: LabRun, recs: list[dict]) -> list[dict]:
    """The records the heatmaps draw: while training they advance in blocks of 15 steps (an unchanged figure costs
    the browser nothing)."""
    return recs[:max(1, len(recs) // 15 * 15)] if run.active and len(recs) >= 15 else recs


def _is_moe(run: LabRun, recs: list[dict]) -> bool:
    return rec.n_moe_layers(recs) > 0 or run.knobs.get("tr_ffn", "moe") == "moe"


def _loss_spec(run: LabRun, recs: list[dict]) -> dict:
    """The loss curve of `run` at len(recs) records as its Vega-Lite spec, built once per server for every tab that
    follows the run (altair's conversion, ~50-100 ms, done once here, not per tab). Records only grow, so (run id,
    record count) names one picture."""
    return _shared(("loss", run.id, run.total_steps, len(recs)),
                   lambda: ct.loss_curve(rec.records_frame(recs), run.total_steps).to_dict())


def _router_figures(run: LabRun, recs: list[dict], layer: int | None) -> dict:
    """MaxVio curve and expert-load / bias heatmaps of a MoE run at len(recs) records, shared like `_loss_spec`
    (thirty joined tabs polling each second would otherwise rebuild the same figures thirty times)."""
    heat = _heat(run, recs)

    def build() -> dict:
        total, label = run.total_steps, _layer_label(layer, run)
        steps = [r["step"] for r in heat if r.get("expert_loads")]
        return {"maxvio": ct.maxvio_curve(rec.records_frame(recs), total),
                "load": ct.expert_load_heatmap(rec.relative_loads(heat, layer), steps, total, label),
                "bias": ct.bias_heatmap(rec.router_biases(heat, layer), steps, total, label)}

    return _shared(("router", run.id, run.total_steps, len(recs), len(heat), layer), build)


def live_charts(run: LabRun, layer: int | None, key: str, lesson: bool, router: bool = True) -> None:
    """Loss curve + MaxVio, expert-load and bias heatmaps of `run` (whatever it has recorded so far); with
    `router=False` the loss curve alone (the router charts are drawn elsewhere: `router_charts`)."""
    recs = run.snapshot()
    with grid():
        with cell():
            st.vega_lite_chart(_loss_spec(run, recs), key=f"{key}_loss")  # Vega-Lite: see app/lab/charts.py LOSS_SERIES
            ui.lesson_note("The train loss (bold: moving average) falls fast at first, then slowly. The red "
                           "validation points are measured on held-out data: when they stop following the train "
                           "curve, the model starts to memorise.", lesson)
        if router:
            _router_cells(run, recs, layer, key, lesson)


def _router_cells(run: LabRun, recs: list[dict], layer: int | None, key: str, lesson: bool) -> None:
    cfg = {"displaylogo": False}
    moe = _is_moe(run, recs)
    figs = _router_figures(run, recs, layer) if moe else {}
    with cell():
        if moe:
            st.plotly_chart(figs["maxvio"], key=f"{key}_maxvio", config=cfg)
            ui.lesson_note("MaxVio is how much the busiest expert exceeds the mean load. With the aux-loss-free "
                           "bias it falls within a few dozen steps; with balancing 'none' it stays high.", lesson)
        else:
            st.info("Dense FFN: no router, so no expert load or biases to show.", icon=":material/info:")
    if moe:
        with cell():
            st.plotly_chart(figs["load"], key=f"{key}_load", config=cfg)
        with cell():
            st.plotly_chart(figs["bias"], key=f"{key}_bias", config=cfg)


def router_charts(run: LabRun, layer: int | None, key: str, lesson: bool) -> None:
    """The router charts of a finished run (MaxVio, expert-load and bias heatmaps, domain × expert matrix)."""
    with grid():
        _router_cells(run, run.snapshot(), layer, key, lesson)
    domain_chart(run, layer, lesson)


def domain_chart(run: LabRun, layer: int | None, lesson: bool) -> None:
    dom = domain_view(run, layer)
    if dom:
        mat, domains, lab, dfm = dom
        ui.chart(ct.domain_expert_heatmap(mat, domains, lab), dfm, f"domain expert {run.label}",
                 key=f"tr_dom_{run.id}", lesson=lesson,
                 notice="Each row is a kind of token. A trained router sends different domains to different "
                        "experts — specialisation that no one programmed. Compare with balancing 'none'.",
                 caption=None if run.train_cfg.dataset == "synthetic" else
                 "Measured on the synthetic domains (the run trained on pydoc text, which has no domain labels).")


def records_csv(run: LabRun) -> bytes:
    df = rec.records_frame(run.snapshot())
    df.insert(0, "run", run.label)
    return df.to_csv(index=False).encode()


def all_records_csv(runs: list[LabRun]) -> bytes:
    frames = []
    for r in runs:
        df = rec.records_frame(r.snapshot())
        df.insert(0, "run", r.label)
        frames.append(df)
    return pd.concat(frames, ignore_index=True).to_csv(index=False).encode() if frames else b""


def domain_view(run: LabRun, layer: int | None):
    """(matrix [domains, experts], domain names, layer label, table) of a finished MoE run, or None."""
    dom = run.after.get("domains")
    if not dom:
        return None
    import numpy as np
    rel = np.asarray(dom["relative"], dtype=float)
    li = None if layer is None else min(layer, len(rel) - 1)
    mat = rel.mean(0) if li is None else rel[li]
    lab = "mean over the MoE layers" if li is None else f"MoE layer {li + 1}"
    df = pd.DataFrame(mat, index=dom["domains"], columns=[f"expert_{e}" for e in range(mat.shape[1])])
    return mat, dom["domains"], lab, df.reset_index(names="domain")


def history_table(runs: list[LabRun]) -> pd.DataFrame:
    rows = []
    for r in runs:
        f = rec.final_losses(r.records)
        last = r.records[-1] if r.records else {}
        rows.append({"run": r.label, "status": STATUS_TEXT.get(r.status, r.status),
                     "steps": last.get("step", 0), "train loss (avg)": f["train"], "val loss": f["val"],
                     "MaxVio (moving avg, last)": rec.final_maxvio(r.records), "time (s)": round(r.elapsed(), 1),
                     "MTP acceptance": (r.after.get("sample") or {}).get("mtp_acceptance")})
    return pd.DataFrame(rows)


# ====================================================================== page sections
_UNSET = object()


def results_section(hist: list[LabRun], layer=_UNSET, lesson: bool = False) -> None:
    """After the runs: the picked run's numbers, charts, specialisation matrix, sampled text and CSV; then the
    overlay of runs with the final-loss delta, the table of runs and the CSV of every record."""
    names = [r.label for r in hist]
    st.header("Results", divider="gray")
    # keyed by the newest run: when a run finishes, the picker shows it (a keyed widget would keep the old pick)
    pick = st.selectbox("Run", names[::-1], key=f"tr_pick_{hist[-1].id}",
                        help="Runs of this browser session, newest first.")
    r = hist[names.index(pick)]
    if r.stored:
        stored_note(r)
    if r.status in ("diverged", "error"):
        st.error(r.message or "The run failed.", icon=":material/error:")
    elif r.message and not (r.stored and r.partial_id):  # a stored partial run's note says how it stopped
        st.warning(r.message, icon=":material/info:")
    f = rec.final_losses(r.records)
    last = r.records[-1]
    sample = r.after.get("sample") or {}
    w = 210  # four cards in one row on a wide screen
    with ui.cards():
        ui.number_with_formula("Train loss (moving avg)", f"{f['train']:.3f}" if f["train"] is not None else "—",
                               r"\mathcal{L}_{\text{LM}}", width=w,
                               detail=f"nats/byte at step {last['step']}; a uniform guess is {rec.UNIFORM_LOSS:.2f}")
        ui.number_with_formula("Validation loss", f"{f['val']:.3f}" if f["val"] is not None else "—",
                               r"\mathcal{L}_{\text{LM}}^{\text{held out}}", width=w,
                               detail=f"held-out {r.train_cfg.dataset} text")
        tokens = last.get("tokens") or 0
        ui.number_with_formula("Training speed", f"{tokens / max(r.elapsed(), 1e-9):,.0f} tok/s",
                               r"\text{tokens} / t", width=w,
                               detail=f"{tokens:,} tokens in {r.elapsed():.1f} s on one core")
        if sample.get("mtp_acceptance") is not None:
            ui.number_with_formula("MTP draft acceptance", f"{100 * sample['mtp_acceptance']:.0f}%",
                                   r"\frac{\#\,\text{drafts confirmed}}{\#\,\text{drafts}}", width=w,
                                   paper=(f"V3: {V3_MTP_ACCEPTANCE[0]:.0%}–{V3_MTP_ACCEPTANCE[1]:.0%} for the "
                                          "2nd token"),
                                   detail=f"{sample['mtp_accepted']} of {sample['mtp_drafts']} drafts while sampling")
    if session.from_url(r):
        # Opened from a link or a reload (a fresh browser, often): the loss curve, a Vega-Lite chart, draws at once;
        # the router charts are plotly, whose bundle costs a fresh browser ~2 s of download, parse and drawing
        # before any of them shows, so they render when opened (docs/performance.md, share link).
        live_charts(r, None, f"res_{r.id}", lesson, router=False)
        exp = st.expander("Router charts: MaxVio, expert load, router biases, domain specialisation",
                          expanded=False, icon=":material/hub:", key=f"tr_router_{r.id}", on_change="rerun")
        with exp:
            if exp.open:
                router_charts(r, layer_choice(r) if layer is _UNSET else layer, f"res_{r.id}", lesson)
    else:
        if layer is _UNSET:  # not drawn above (no live view): right above the charts it controls
            layer = layer_choice(r)
        live_charts(r, layer, f"res_{r.id}", lesson)
        domain_chart(r, layer, lesson)
    st.subheader("Text sampled from the model")
    if sample:
        prompt = r.after.get("sample_prompt", "")
        own = bool(r.knobs.get("tr_prompt"))
        st.caption(f"Prompt {code_span(prompt)} "
                   + ("(yours)" if own else f"(the {r.train_cfg.dataset} default; type your own in **Sample prompt** "
                                            f"in the sidebar, then train again)")
                   + f" + {len(sample.get('tokens', []))} sampled bytes, temperature 0.8, seed {r.train_cfg.seed}" + (
                       f"; the MTP module drafted the token after next at every step and "
                       f"{sample['mtp_accepted']} of {sample['mtp_drafts']} drafts matched what the model then "
                       f"sampled." if sample.get("mtp_acceptance") is not None else "; MTP was off (no drafts)."))
        if session.from_url(r):  # plain text: the code block's highlighter chunk delays a fresh browser (below)
            st.text(sample["text"])
        else:
            st.code(sample["text"], language=None, wrap_lines=True)
        st.caption("What to look for: " + (
            "after a good run the text keeps each domain's rule — sums that add up, brackets that close in order, "
            "a copy after |, letters in order. " + ui.domains_caption(r.train_cfg.seed).replace("The four", "The")
            if r.train_cfg.dataset == "synthetic" else
            "English words, spaces and punctuation in place of random bytes; at this size and length, fragments of "
            "Python's documentation rather than sense."))
    elif r.after.get("sample_error"):
        st.warning(r.after["sample_error"])
    else:
        st.caption("No sample: the run stopped before it could be sampled.")
    st.download_button(f"Download every record of {r.label} (CSV, {len(r.records)} rows)",
                       lambda r=r: records_csv(r), file_name=f"eva-training-run{r.number}.csv", mime="text/csv",
                       key=f"tr_csv_{r.id}", on_click="ignore", icon=":material/download:")

    st.header("Compare runs", divider="gray")
    default = names[-2:] if len(names) >= 2 else names
    # keyed by the newest run: when a run finishes, the selection starts again from "the last two runs"
    chosen = st.multiselect("Runs to overlay", names, default=default, key=f"tr_overlay_{hist[-1].id}",
                            help="Change one knob between runs (e.g. FP8 vs FP32, MLA vs MHA, aux-loss-free vs "
                                 "aux loss) and overlay them; the title gives the final-loss delta of the last "
                                 "picked run against the first.")
    sel = [hist[names.index(n)] for n in chosen]
    table = history_table(hist)
    curves = [(x.label, x.snapshot()) for x in sel]
    if len(curves) >= 2:  # one run's curves are already drawn above: an overlay of one would only cost a redraw
        ui.chart(ct.overlay_runs(curves), table, "training runs", key="tr_overlay_chart", lesson=lesson,
                 notice="Same seed, same data order: the gap between two curves is caused by the one knob you "
                        "changed.")
        mv = ct.overlay_maxvio(curves)
        if mv is not None:
            ui.chart(mv, rec.maxvio_table(curves), "maxvio of runs", key="tr_overlay_maxvio", lesson=lesson,
                     notice="The balancing strategies differ here more than in the loss: compare how fast and how "
                            "far each run's MaxVio falls.")
    else:
        st.caption(("Pick two or more runs above" if len(names) >= 2 else
                    "Train a second run with one knob changed (for example FP8 vs FP32, or balancing 'none')")
                   + " to overlay their loss and MaxVio curves here, with the final-loss delta in the title.")
    if all(session.from_url(x) for x in hist):
        # Runs opened from a link or a reload: a static table. The data grid (1.2 MB of frontend chunks) and the code
        # block's highlighter (1.5 MB) cost a fresh browser ~0.5 s before the results show (docs/performance.md,
        # share link); a tab that trained its runs has them loaded already.
        st.table(table.set_index(table.columns[0]))
    else:
        st.dataframe(table, hide_index=True, width="stretch")
    st.download_button("Download every record of every run (CSV)", lambda: all_records_csv(hist),
                       file_name="eva-training-runs.csv", mime="text/csv", key="tr_csv_all", on_click="ignore",
                       icon=":material/download:", type="tertiary")
    share_section(sel or hist[-1:])


def stored_note(run: LabRun) -> None:
    """A run opened from the store (or from a link): say so, when and how long it trained, and offer to train it
    again here — or, for a partial run, say where it stopped and offer to train the full run."""
    import datetime
    when = datetime.datetime.fromtimestamp(run.finished or 0, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if run.partial_id:
        with st.container(horizontal=True, vertical_alignment="center"):
            st.warning(f"**Partial run** — {run.cut_text()} (trained on this server on {when} for "
                       f"{run.elapsed():.1f} s; shown from the run store, nothing was trained now). Its curves end "
                       "where it stopped; Start on these knobs trains the full run.", icon=":material/content_cut:")
            st.button("Train the full run", icon=":material/play_arrow:", key=f"tr_full_{run.id}",
                      on_click=session.on_train_again, args=(run, False),
                      help="Start this run's knobs and seed: the finished run at once if this server has it, "
                           "else it trains here.")
        return
    with st.container(horizontal=True, vertical_alignment="center"):
        st.success(f"**Stored run** — trained on this server on {when} in {run.elapsed():.1f} s; shown from the run "
                   "store, nothing was trained now. The same knobs and seed train the same numbers, so this is "
                   "what Start would draw.", icon=":material/inventory_2:")
        st.button("Train again", icon=":material/replay:", key=f"tr_again_{run.id}", on_click=session.on_train_again,
                  args=(run,), help="Train this run's knobs and seed here and watch it live (the result replaces "
                                    "the stored one).")


def run_query(run: LabRun, lesson: bool = False, model: str = "deepseek-v3") -> dict[str, str]:
    """The query parameters that open the lab with `run`'s knobs and seed (defaults left out, as Streamlit does),
    for a stored run (finished, or partial: cut by Stop or the time cap) its id (`?runs=`: opened where the store
    has it, the results show with no training; where it does not, the knobs are there to train it), and the
    sidebar's `model` (the lab trains `mini` either way, but the opened page's sidebar shows it; an uploaded config
    cannot travel in a link)."""
    q = {k: KNOBS[k].fmt(v) for k, v in run.knobs.items() if k in KNOBS and v != KNOBS[k].default}
    if run.link_id:  # a finished run's key, or a partial run's own id
        q[session.RUNS_PARAM] = run.link_id
    if run.train_cfg.seed != 0:
        q["seed"] = str(run.train_cfg.seed)
    if model not in ("deepseek-v3", "uploaded"):
        q["model"] = model
    if lesson:
        q["lesson"] = "true"
    return q


def run_link(run: LabRun, lesson: bool = False) -> str:
    """An absolute link (when the server's address is known) that opens the lab with `run`'s knobs."""
    from urllib.parse import urlencode, urljoin
    qs = urlencode(run_query(run, lesson, st.session_state.get("model", "deepseek-v3")))
    path = "training" + (f"?{qs}" if qs else "")
    base = getattr(st.context, "url", None)
    return urljoin(base, path) if base else path


def share_section(runs: list[LabRun]) -> None:
    """How to show these runs to a colleague: a link carries a stored run's id and its knobs. One link per run."""
    lesson = bool(st.session_state.get("lesson"))
    st.info("**Links carry results.** Each link below names a run and its knobs: on this server it opens the run's "
            "curves and results at once, with no training (the server's run store keeps finished runs, and runs cut "
            "by Stop or the time cap as partial runs). Where the store no longer has it, the link still sets the "
            "run's knobs and seed, and Start trains the same numbers (a cut run: the full run). The address bar does "
            "the same for every stored run of this tab, so a reload keeps them.",
            icon=":material/share:")
    # tracked (on_change="rerun"): the links' code blocks are sent only once the expander is opened
    exp = st.expander(f"Links to {'this run' if len(runs) == 1 else f'these {len(runs)} runs'}",
                      icon=":material/link:", key="tr_links", on_change="rerun")
    with exp:
        if exp.open:
            for r in runs:
                st.markdown(f"**{r.label}**")
                st.code(run_link(r, lesson), language=None, wrap_lines=True)


def preview_section(mcfg, cfg, expanded: bool, lesson: bool) -> None:
    """Before a run: the lab model's size and the learning-rate schedule the knobs give."""
    import json

    from app import compute
    from core.units import human_count
    from core.train import lr_at

    # Tracked (on_change="rerun"): a collapsed preview renders nothing, so a page that opens with results (a share
    # link, a reload) does not pay for two charts nobody sees; the key follows `expanded` so that it still opens
    # by itself before the first run and closes once results exist.
    exp = st.expander("The model and schedule you are about to train", expanded=expanded,
                      icon=":material/visibility:", key=f"tr_preview_{int(expanded)}", on_change="rerun")
    with exp:
        if not exp.open:
            return
        cfg_json = json.dumps(mcfg.to_hf(), sort_keys=True)
        d = compute.overview.overview(cfg_json, cfg.seq_len, "fp32")
        c = d["counts"]
        with ui.cards():
            ui.number_with_formula("Parameters", human_count(c["total"]), r"N_{\text{total}}", width=250,
                                   detail=f"+ {human_count(c['mtp'])} in the MTP module" if cfg.mtp else "MTP off")
            ui.number_with_formula("Activated per token", human_count(c["activated"]), r"N_{\text{act}}", width=250,
                                   detail=f"{100 * c['activated'] / c['total']:.0f}% of the weights")
            ui.number_with_formula("Tokens per step", f"{cfg.batch_size * cfg.seq_len:,}", r"B \times T", width=250,
                                   detail=f"{cfg.steps} steps; validation every {cfg.eval_every}")

        def build():  # the same knobs give the same two figures: a classroom opening one step builds them once
            lrs = rec.lr_table([lr_at(i, cfg) for i in range(cfg.steps)])
            return ct.lab_params(d["params"], c), ct.lr_schedule(lrs, cfg.warmup), lrs

        params_fig, lr_fig, lrs = _shared(("preview", cfg_json, repr(cfg)), build)
        with grid():
            with cell():
                ui.chart(params_fig, d["params"].drop(columns=["formula"]),
                         "lab model parameters", key="tr_params", lesson=lesson,
                         notice="Routed experts hold most weights, but each token activates only its top-k of them.")
            with cell():
                ui.chart(lr_fig, lrs, "learning rate schedule", key="tr_lr_chart", lesson=lesson)


# ====================================================================== sidebar status (every other page)
def sidebar_status(page) -> None:
    """While this session's run is active and the user is on another page: progress in the sidebar, and the
    polling that keeps the run's heartbeat alive; once it has finished, a note until the lab is opened again.
    Cheap no-op otherwise."""
    run = current()
    if run is None or getattr(page, "url_path", "") == "training":
        return
    if not run.active:
        if run.records and run not in history():
            st.sidebar.success(f"Training {run.label}: {STATUS_TEXT.get(run.status, run.status)}.",
                               icon=":material/check_circle:")
            st.sidebar.page_link("pages/training.py", label="See the results in the training lab",
                                 icon=":material/model_training:")
        return

    @st.fragment(run_every=SIDEBAR_POLL_S)
    def _status():
        run.touch()
        with st.sidebar:
            frac, text = progress_text(run)
            st.progress(frac, text=f"Training {run.label}: " + text)
            st.page_link("pages/training.py", label="Open the training lab", icon=":material/model_training:")
        if not run.active:
            st.rerun(scope="app")  # stop polling; the finished note takes over

    _status()
