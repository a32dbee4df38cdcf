"""AppTest for the training lab: a tiny run to completion with its curve and results, Stop, a second concurrent
start refused politely (then queued), a run stopping when its session goes away, caps and impossible knob
combinations as messages; plus the pure chart builders on real records.

Runs are tiny (25 steps of 4 × 32 tokens, ~2-4 s on one core) so the module stays around a minute."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from apptest_helpers import HANG_S

from app.lab import charts as ct
from app.lab import records as rec
from app.lab import knobs, session, views
from app.lab import manager as runs


@pytest.fixture(autouse=True)
def patient_server(monkeypatch):
    """No run may end because this machine is slow: AppTest reruns under load can take longer than the server's
    heartbeat window (20 s) or a run longer than its wall-time cap (120 s), which would stop a run a test is still
    watching. Both become HANG_S here; the test of the heartbeat itself sets its own window."""
    monkeypatch.setattr(runs, "STALE_AFTER_S", HANG_S)
    monkeypatch.setattr(runs, "MAX_SECONDS", HANG_S)
    monkeypatch.setattr(knobs, "MAX_SECONDS", HANG_S)


@pytest.fixture(autouse=True)
def idle_server(patient_server, tmp_path):
    """Every test starts and ends with no run on the (process-wide) run manager, and with an empty run store of its
    own (a run another test trained is not served from the store)."""
    mgr = session.manager()
    _drain(mgr)
    fresh_store(mgr, tmp_path / "store")
    yield mgr
    _drain(mgr)


def fresh_store(mgr, folder):
    from app.lab.store import RunStore
    mgr._store = RunStore(folder)
    mgr._recent.clear()
    return mgr._store


def _drain(mgr, timeout=HANG_S):
    for r in list(mgr.queue):
        mgr.cancel(r)
    t0 = time.time()
    while mgr.active is not None and time.time() - t0 < timeout:
        mgr.active.stop_event.set()
        time.sleep(0.1)
    assert mgr.active is None, "a run did not stop"


APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
TINY = {"tr_steps": "25", "tr_batch": "4", "tr_seq": "32"}
LONG = {"tr_steps": "400", "tr_batch": "4", "tr_seq": "32"}


def lab(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=HANG_S)
    at.query_params.update(query or {})
    at.switch_page("pages/training.py")
    return at.run()


def run_of(at: AppTest):
    return at.session_state["_tr_run"] if "_tr_run" in at.session_state else None


def poll_until(at: AppTest, cond, timeout=HANG_S, every=0.3):
    """Rerun `at` until `cond()` holds; `timeout` only catches a hang (see apptest_helpers.HANG_S)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        at.run()
        if cond():
            return
        time.sleep(every)
    raise AssertionError("timed out")


def specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def vega_charts(at: AppTest) -> list[tuple[dict, "pd.DataFrame"]]:
    """The page's Vega-Lite charts: (spec, every dataset of the chart concatenated) each."""
    import pandas as pd
    from streamlit import dataframe_util
    out = []
    for c in at.get("vega_lite_chart"):
        frames = [dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data) for d in c.proto.datasets]
        out.append((json.loads(c.proto.spec), pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()))
    return out


def share_links(at: AppTest) -> list[str]:
    """The run links of the results page, after opening their expander (its code blocks render only when open)."""
    at.session_state["tr_links"] = True
    at.run()
    return [c.value for c in at.code if "runs=" in c.value]


def loss_chart(at: AppTest) -> "pd.DataFrame":
    """The data of the lab's loss curve (the Vega-Lite chart whose title says the loss falls)."""
    return next(d for s, d in vega_charts(at) if "loss falls" in " ".join(s["title"]["text"]))


def loss_points(data) -> int:
    """Points of the raw train-loss curve: one per recorded step."""
    return int((data["series"] == ct.TRAIN_SERIES).sum())


def npoints(arr) -> int:
    """Length of a plotly data array in a figure's JSON (a list, or a typed array {'dtype', 'bdata'})."""
    if isinstance(arr, dict) and "bdata" in arr:
        import base64

        import numpy as np
        return len(np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"])))
    return len(arr)


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def test_tiny_run_to_completion_shows_curve_and_results(idle_server):
    at = lab(TINY)
    clean(at)
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= 2, "the preview (parameters, learning rate) before any run"
    at.button(key="tr_start").click().run()
    clean(at)
    run = run_of(at)
    assert run is not None and idle_server.active is run
    poll_until(at, lambda: len(run.records) >= 3)
    n_live = loss_points(loss_chart(at))  # the live curve, growing
    assert 1 <= n_live <= 25
    assert any(p.proto.value for p in at.get("progress")), "progress bar while running"
    poll_until(at, lambda: not run.active)
    at.run()
    clean(at)
    assert run.status == "done" and len(run.records) == 25
    assert idle_server.active is None, "the server is free again"
    titles = [s["layout"]["title"]["text"] for s in specs(at)]
    loss = loss_chart(at)
    assert loss_points(loss) == 25 >= n_live
    assert loss[loss["series"] == "validation loss"]["step"].tolist() == [r["step"] for r in run.records
                                                                           if r.get("val_loss") is not None]
    assert any("MaxVio" in t for t in titles) and any("busiest expert" in t for t in titles)
    assert any("domains" in t for t in titles), "domain x expert specialisation matrix"
    assert at.code and at.code[0].value.startswith("47+8="), "sampled text"
    assert any(m.label == "MTP draft acceptance" for m in at.metric)
    labels = [b.proto.label for b in at.get("download_button")]
    assert any("every record" in lbl and "25 rows" in lbl for lbl in labels)
    csv = views.records_csv(run).decode()
    assert csv.count("\n") == 26 and "load_moe0_e0" in csv and "bias_moe2_e15" in csv and "val_loss" in csv
    assert any("#1 steps=25" in o for o in at.multiselect(key=f"tr_overlay_{run.id}").value)


def stopped_run(at: AppTest):
    """Start a LONG run in `at`, press Stop once it has two records, wait until it is over; returns the run."""
    at.button(key="tr_start").click().run()
    run = run_of(at)
    poll_until(at, lambda: len(run.records) >= 2)
    at.button(key="tr_stop").click().run()
    poll_until(at, lambda: not run.active)
    clean(at)
    return run


def test_stop_stops_and_two_runs_overlay_with_delta(idle_server):
    at = lab(LONG)
    run = stopped_run(at)
    assert run.status == "stopped" and len(run.records) < 400
    assert idle_server.active is None
    assert any("Stopped at step" in w.value for w in at.warning)
    # a second run with one knob changed, then the overlay names both and gives the final-loss delta
    at.radio(key="tr_attn").set_value("mha").run()
    at.select_slider(key="tr_steps").set_value(25).run()
    at.button(key="tr_start").click().run()
    run2 = run_of(at)
    assert run2 is not run
    poll_until(at, lambda: not run2.active)
    at.run()
    clean(at)
    assert at.selectbox(key=f"tr_pick_{run2.id}").value.startswith("#2 MHA"), "the picker shows the newest run"
    assert any(c.value.startswith("47+8=") for c in at.code)
    shown = next(m.value for m in at.metric if m.label == "Train loss (moving avg)")
    assert shown == f"{rec.final_losses(run2.records)['train']:.3f}", "the cards describe the picked (newest) run"
    overlay = next(s for s in specs(at) if "nats/byte" in s["layout"]["title"]["text"])
    names = {t["name"] for t in overlay["data"] if t.get("name")}
    assert any(n.startswith("#1") for n in names) and any(n.startswith("#2 MHA") for n in names), names
    assert "#2 MHA" in overlay["layout"]["title"]["text"]
    mv = next(s for s in specs(at) if s["layout"]["title"]["text"].startswith("#2 MHA") and "MaxVio" in
              s["layout"]["title"]["text"])
    assert [t["name"] for t in mv["data"]] == [run.label, run2.label], "MaxVio of both runs overlaid"
    # one link per overlaid run, with that run's knobs and the id it is stored under: the finished run's key, the
    # stopped run's own partial id (never its knobs' key, which names the full run)
    assert any("Links carry results" in i.value for i in at.info)
    links = share_links(at)
    assert len(links) == 2 and "tr_steps=400" in links[0] and "tr_attn=MHA" in links[1] and "tr_steps=25" in links[1]
    assert run.partial_id and run.partial_id != run.key and f"runs={run.partial_id}" in links[0]
    assert f"runs={run2.key}" in links[1]


def test_typed_sample_prompt_reaches_the_worker_and_the_caption(idle_server):
    prompt = "été 12+"  # multi-byte UTF-8 (10 bytes): the byte-level model gets every byte
    at = lab(TINY)
    assert at.text_input(key="tr_prompt").value == "", "empty by default (the dataset's default prompt is used)"
    at.text_input(key="tr_prompt").input(prompt).run()
    clean(at)
    assert not at.error, [e.value for e in at.error]
    at.button(key="tr_start").click().run()
    run = run_of(at)
    assert run is not None and run.prompt == prompt
    poll_until(at, lambda: not run.active)
    at.run()
    clean(at)
    assert run.status == "done" and run.after["sample_prompt"] == prompt
    assert at.code and at.code[0].value.startswith(prompt), "the sampled text continues the typed prompt"
    assert any(f"`{prompt}` (yours)" in c.value for c in at.caption), [c.value for c in at.caption]
    assert run.label == "#1 steps=25, seq=32", "the prompt does not change training: not in the label"


def test_over_long_sample_prompt_is_a_message_and_starts_nothing(idle_server):
    at = lab(TINY)
    # typed and Start clicked in one go (the box commits when the click takes the focus): the callback refuses it
    at.text_input(key="tr_prompt").input("é" * 33)  # 33 characters, 66 bytes
    at.button(key="tr_start").click().run()
    clean(at)
    assert run_of(at) is None and idle_server.active is None
    msg = " ".join(e.value for e in at.error)
    assert "Sample prompt" in msg and "66 bytes" in msg and "at most 64" in msg, msg
    assert at.button(key="tr_start").disabled
    at.text_input(key="tr_prompt").input("é" * 32).run()  # exactly 64 bytes is allowed
    clean(at)
    assert not at.error and not at.button(key="tr_start").disabled


def test_a_run_link_reproduces_the_run_in_another_session(idle_server, tmp_path):
    """What the page promises a colleague: the link of a run carries its id and its knobs. Where the store is empty
    the knobs are there, and training them again on this server draws the same curve (the worker process, seed and
    data order are the same) — the fact that lets the store serve a run instead of training it."""
    a = lab({**TINY, "tr_bal": "aux loss"})
    a.button(key="tr_start").click().run()
    run_a = run_of(a)
    poll_until(a, lambda: not run_a.active)
    a.run()
    link = next(x for x in share_links(a) if "tr_bal=" in x)
    from urllib.parse import parse_qsl, urlparse
    q = dict(parse_qsl(urlparse(link).query))
    changed = {k: v for k, v in TINY.items() if str(knobs.defaults()[k]) != v}  # a link omits default knobs
    assert q == {**changed, "tr_bal": "aux loss", "runs": run_a.key}, q
    fresh_store(idle_server, tmp_path / "empty")  # another server: its store does not have the run
    b = lab(q)  # the colleague: a new session opened with the link's query
    missing = next(w.value for w in b.warning if "has not stored" in w.value)
    assert run_a.key in missing and "press **Start training**" in missing
    assert run_of(b) is None and idle_server.active is None, "opening a link trains nothing"
    b.button(key="tr_start").click().run()
    run_b = run_of(b)
    poll_until(b, lambda: not run_b.active)
    assert run_b.label == run_a.label and run_b.status == run_a.status == "done" and not run_b.stored
    assert run_b.key == run_a.key
    assert [r["loss"] for r in run_b.records] == [r["loss"] for r in run_a.records]
    assert [r["max_vio"] for r in run_b.records] == [r["max_vio"] for r in run_a.records]


def test_simultaneous_starts_of_the_same_knobs_train_once(idle_server, monkeypatch):
    """A classroom: twenty sessions press Start on the same knobs at the same instant (threads released together).
    The manager joins or starts under one lock, so exactly one run trains and the nineteen others follow it; before,
    two Starts could both miss the join and the second found the server busy and queued a copy."""
    import threading
    from app.lab.manager import LabRun
    from app.lab.store import run_id, run_spec
    mcfg, cfg = knobs.lab_config(LONG, 0)
    spec = run_spec(mcfg, cfg, knobs.sample_prompt(LONG))
    gate, out = threading.Barrier(20), []
    started = []

    def fake_start(run):  # the lock logic is under test, not the worker: mark the run started, send nothing
        idle_server.active, run.status = run, "starting"
        started.append(run)

    monkeypatch.setattr(idle_server, "_start", fake_start)

    def press(i):
        run = LabRun(owner=f"student-{i}", number=1, knobs=dict(LONG), model_cfg=mcfg, train_cfg=cfg,
                     prompt=knobs.sample_prompt(LONG), session_id=None, spec=spec, key=run_id(spec))
        gate.wait()
        out.append(idle_server.start_or_join(run, queue=True))

    threads = [threading.Thread(target=press, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = sorted(o for o, _, _ in out)
    assert outcomes == ["joined"] * 19 + ["started"], outcomes
    trained = {id(r) for _, _, r in out}
    assert len(trained) == 1 and not idle_server.queue, "every session follows the one run; nothing is queued"
    assert len(started) == 1 and len(idle_server.active.viewers) == 20
    idle_server.active, started[0].status = None, "stopped"  # nothing ran: free the manager for the next test


def test_second_concurrent_start_is_refused_politely_then_queued(idle_server):
    a = lab(LONG)
    a.button(key="tr_start").click().run()
    run_a = run_of(a)
    assert idle_server.active is run_a
    b = lab(TINY)
    clean(b)
    assert any("server is busy" in w.value for w in b.warning), "B sees the busy server before pressing Start"
    b.button(key="tr_start").click().run()
    clean(b)
    assert run_of(b) is None, "B's run must not start"
    assert idle_server.active is run_a
    msg = " ".join(w.value for w in b.warning)
    assert "Your run was not started" in msg and "one run at a time" in msg
    assert b.toggle(key="tr_watch").value is True, "B can watch A's run"
    # B queues its run: position 1, it starts by itself once A is stopped
    b.button(key="tr_queue").click().run()
    run_b = run_of(b)
    assert run_b is not None and run_b.status == "queued" and idle_server.position(run_b) == 1
    assert any("#1 in the queue" in i.value for i in b.info)
    a.button(key="tr_stop").click().run()
    poll_until(b, lambda: run_b.status not in ("queued",))
    assert idle_server.active is run_b or run_b.status == "done"
    poll_until(b, lambda: not run_b.active)
    assert run_b.status == "done"


def test_run_stops_when_its_session_goes_away(idle_server, monkeypatch):
    monkeypatch.setattr(runs, "STALE_AFTER_S", 1.0)
    at = lab(LONG)
    at.button(key="tr_start").click().run()
    run = run_of(at)
    t0 = time.time()
    while run.active and time.time() - t0 < HANG_S:  # nobody polls: the tab "went away"
        time.sleep(0.2)
    assert run.status == "abandoned", run.status
    assert "nobody was watching" in run.message
    assert idle_server.active is None


def test_other_pages_show_progress_and_keep_the_run_alive(idle_server):
    at = lab(LONG)
    at.button(key="tr_start").click().run()
    run = run_of(at)
    beat = run.heartbeat
    at.switch_page("pages/overview.py").run()
    clean(at)
    texts = [p.proto.text for p in at.get("progress")]
    assert any(t.startswith("Training #1") for t in texts), texts
    assert run.heartbeat > beat, "polling from another page refreshes the heartbeat"
    from app.pages import PAGES  # (the Overview's landing links every dashboard by its title)
    assert [lnk.proto.label for lnk in at.get("page_link")
            if lnk.proto.label not in {p.title for p in PAGES}] == ["Open the training lab"]
    idle_server.cancel(run)


@pytest.mark.parametrize("query,knob", [
    ({"tr_steps": "400", "tr_batch": "32", "tr_seq": "256"}, "Steps × batch × sequence length"),
    ({"tr_experts": "4", "tr_topk": "4"}, "Experts per token"),
    ({"tr_prompt": "x" * 65}, "Sample prompt"),
])
def test_caps_and_impossible_combinations_are_messages(query, knob):
    at = lab(query)
    clean(at)
    assert at.error and knob in at.error[0].value, [e.value for e in at.error]
    assert at.button(key="tr_start").disabled


def test_url_sets_every_lab_knob():
    q = {"tr_attn": "GQA", "tr_ffn": "MoE", "tr_experts": "8", "tr_topk": "2", "tr_bal": "both",
         "tr_gamma": "0.003", "tr_alpha": "0.0001", "tr_prec": "FP8 deepseek-gemm", "tr_mtp": "false",
         "tr_data": "pydoc", "tr_steps": "50", "tr_lr": "0.001", "tr_batch": "4", "tr_seq": "128", "seed": "3",
         "tr_prompt": "def f("}
    at = lab(q)
    clean(at)
    assert not at.warning, [w.value for w in at.warning]
    vals = {"tr_attn": at.radio(key="tr_attn").value, "tr_topk": at.select_slider(key="tr_topk").value,
            "tr_prec": at.selectbox(key="tr_prec").value, "tr_mtp": at.toggle(key="tr_mtp").value,
            "tr_gamma": at.select_slider(key="tr_gamma").value, "tr_data": at.radio(key="tr_data").value}
    assert vals == {"tr_attn": "gqa", "tr_topk": 2, "tr_prec": "deepseek-gemm", "tr_mtp": False, "tr_gamma": 0.003,
                    "tr_data": "pydoc"}
    mcfg, cfg = knobs.lab_config({k: at.session_state[k] for k in knobs.KNOBS}, 3)
    assert (cfg.attention, cfg.precision, cfg.mtp, cfg.balancing, cfg.seed) == ("gqa", "deepseek-gemm", False, "both", 3)
    assert mcfg.n_routed_experts == 8 and mcfg.num_experts_per_tok == 2
    assert at.text_input(key="tr_prompt").value == "def f("
    assert knobs.sample_prompt({k: at.session_state[k] for k in knobs.KNOBS}) == "def f("
    assert knobs.sample_prompt({"tr_data": "pydoc"}) == "The " and knobs.sample_prompt({}) == "47+8=", \
        "dataset defaults"


def _records(steps=6, layers=3, experts=16, seed=0):
    """Step records shaped like core.train's (see core.train.RECORD_FIELDS), without training."""
    import numpy as np
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(1, steps + 1):
        loads = rng.integers(1, 200, size=(layers, experts))
        recs.append({"step": i, "loss": 5.5 - 0.3 * i, "lm_loss": 5.0 - 0.3 * i, "mtp_loss": 0.5, "val_loss":
                     (5.2 - 0.3 * i) if i % 3 == 0 else None, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0,
                     "tokens": 64 * i, "elapsed_s": 0.1 * i, "expert_loads": loads.tolist(),
                     "max_vio": 0.5, "max_vio_layers": [0.5] * layers,
                     "router_bias": (rng.normal(size=(layers, experts)) * 0.01 * i).tolist(), "fp8": None,
                     "error": None})
    return recs


def test_chart_builders_on_records():
    recs = _records()
    df = rec.records_frame(recs)
    assert len(df) == 6 and {"loss", "val_loss", "max_vio_moe0", "load_moe0_e15", "bias_moe2_e0"} <= set(df)
    rel = rec.relative_loads(recs)
    assert rel.shape == (6, 16) and abs(rel.mean() - 1) < 1e-6
    assert ct.maxvio_curve(df, 6).data
    spec = ct.loss_curve(df, 6).to_dict()  # a Vega-Lite chart: its data is the long table of ct.loss_frame
    assert "loss falls" in " ".join(spec["title"]["text"]) and "6 of 6 steps" in " ".join(spec["title"]["text"])
    long = ct.loss_frame(df)
    assert long.groupby("series").size().to_dict() == {ct.TRAIN_SERIES: 6, "train loss (moving average)": 6,
                                                        "MTP loss (λ-weighted, avg)": 6,
                                                        "validation loss": int(df["val_loss"].notna().sum())}
    rows = [r for d in spec["datasets"].values() for r in d if r.get("series") == ct.TRAIN_SERIES]
    assert [r["loss"] for r in rows] == df["lm_loss"].where(df["lm_loss"].notna(), df["loss"]).tolist()
    empty = ct.loss_curve(df.iloc[:0], 6).to_dict()
    assert empty["title"]["text"][0].startswith("Waiting for the first step")
    assert ct.expert_load_heatmap(rel, list(df["step"]), 6, "mean").data
    assert ct.bias_heatmap(rec.router_biases(recs), list(df["step"]), 6, "mean").data
    fig = ct.overlay_runs([("A", recs), ("B", _records(4, seed=1))])
    assert "B ends" in fig.layout.title.text and "A" in fig.layout.title.text
    dense = [{**r, "max_vio": None, "expert_loads": None, "max_vio_layers": None, "router_bias": None} for r in recs]
    mv = ct.overlay_maxvio([("A", recs), ("D", dense), ("B", _records(4, seed=1))])
    assert [t.name for t in mv.data] == ["A", "B"] and mv.layout.title.text.startswith("B ends at MaxVio")
    assert mv.data[1].line.color == ct.palette.RUNS[2], "a run keeps its colour of the loss overlay"
    assert ct.overlay_maxvio([("D", dense)]) is None, "dense runs only: no MaxVio chart"
    assert list(rec.maxvio_table([("A", recs), ("D", dense)])["run"].unique()) == ["A"]
    assert ct.domain_expert_heatmap([[1, 0], [0, 1]], ["x", "y"], "layer").layout.title.text.startswith("Experts")
    f = rec.final_losses(recs)
    assert f["val"] == pytest.approx(5.2 - 1.8) and f["train"] < 5.0


def test_run_labels_and_estimates():
    assert knobs.run_label({}, 1) == "#1 default"
    assert knobs.run_label({"tr_prec": "deepseek-gemm", "tr_attn": "mha"}, 2) == "#2 MHA, FP8 deepseek-gemm"
    assert knobs.run_label({"tr_ffn": "dense", "tr_experts": 4}, 3) == "#3 dense", "MoE knobs do not apply to dense"
    _, small = knobs.lab_config({"tr_steps": 25}, 0)
    _, default = knobs.lab_config({}, 0)
    _, fp8 = knobs.lab_config({"tr_prec": "deepseek-gemm"}, 0)
    assert knobs.estimate_seconds(small) < knobs.estimate_seconds(default) < knobs.estimate_seconds(fp8)


def test_fp8_recipe_knobs_follow_core():
    """The lab's precision and switch options are core's; one switch flipped gives that recipe minus (plus) it."""
    from core import fp8
    from core.train import PRECISIONS
    assert tuple(knobs.PRECISION_LABELS) == PRECISIONS and knobs.FP8_SWITCHES == tuple(fp8.SWITCHES)
    _, full = knobs.lab_config({"tr_prec": "deepseek-v3"}, 0)
    assert full.fp8_recipe is fp8.RECIPES["deepseek-v3"]
    _, minus = knobs.lab_config({"tr_prec": "deepseek-v3", "tr_fp8sw": "-wgrad_128x1"}, 0)
    assert minus.fp8_recipe.wgrad_tiling == "1x128" and minus.fp8_recipe.attn_out_fmt == "e5m6"
    assert set(fp8.switches_of(minus.fp8_recipe)) == set(fp8.SWITCHES) - {"wgrad_128x1"}
    _, plus = knobs.lab_config({"tr_prec": "deepseek-gemm", "tr_fp8sw": "+bf16_moments"}, 0)
    assert fp8.switches_of(plus.fp8_recipe) == ("bf16_moments",)
    assert knobs.run_label({"tr_prec": "deepseek-v3", "tr_fp8sw": "-acc14"}, 4) == \
        "#4 FP8 deepseek-v3, FP8 without acc14"
    assert knobs.run_label({"tr_fp8sw": "-acc14"}, 5) == "#5 default", "switches do not apply to fp32"
    with pytest.raises(knobs.LabConfigError, match="FP8 recipe switch"):
        knobs.lab_config({"tr_prec": "tensor-current", "tr_fp8sw": "+wgrad_128x1"}, 0)


def test_idle_worker_exits_and_the_next_run_starts_a_new_one(monkeypatch):
    """A worker with no job for EVA_LAB_WORKER_IDLE_S offers to exit; the manager lets it go (its ~300 MB return to
    the server) and the next Start launches a fresh worker that trains the run to the end."""
    import time as _time

    from app.lab.manager import LabRun, RunManager
    from core.config import PRESETS
    from core.train import TrainConfig

    monkeypatch.setenv("EVA_LAB_WORKER_IDLE_S", "1")
    mgr = RunManager()
    try:
        mgr.ensure_worker()
        first = mgr._proc
        first.wait(timeout=HANG_S)  # imports torch, reports ready, then idles for 1 s and is retired
        assert first.returncode == 0 and getattr(first, "eva_retired", False)
        assert mgr._proc is None and not mgr.worker_ready()
        run = LabRun(owner="t", number=1, knobs={}, model_cfg=PRESETS["tiny"],
                     train_cfg=TrainConfig(steps=3, batch_size=2, seq_len=16, eval_every=0, dataset="synthetic"))
        assert mgr.request(run) == ("started", 0)
        assert mgr._proc is not None and mgr._proc is not first
        deadline = _time.time() + HANG_S
        while run.finished is None and _time.time() < deadline:
            run.touch()
            _time.sleep(0.1)
        assert run.status == "done" and len(run.records) == 3, (run.status, run.message)
    finally:
        mgr.close()


def test_lab_defaults_are_cores_default_run():
    """The knobs' defaults are read from core (APP_DEFAULT, the `mini` preset): the untouched lab trains exactly
    core's default lab run, and every default is an option its widget offers."""
    from core.config import PRESETS
    from core.train import APP_DEFAULT

    mcfg, cfg = knobs.lab_config({}, 0)
    assert cfg.replace(max_time_s=None) == APP_DEFAULT
    assert cfg.max_time_s == knobs.MAX_SECONDS
    assert (mcfg.n_routed_experts, mcfg.num_experts_per_tok) == (PRESETS["mini"].n_routed_experts,
                                                                 PRESETS["mini"].num_experts_per_tok)
    for kn in knobs.KNOBS.values():
        assert not kn.options or kn.default in kn.options, kn.key
    assert knobs.run_label({}, 1) == "#1 default"
