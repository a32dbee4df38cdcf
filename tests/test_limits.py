"""Hosted-mode limits (issue 7, items 4 and 6): a shared Community Cloud instance (0.7–2.7 GB, ≤ 2 cores) serves a
whole class, so every knob that could make the server build something large is capped, and the cap is reported.

* knob ranges: every numeric knob on every page (discovered from the AppTest tree) is bounded, except a short
  allowlist of formula-only inputs whose values core validates (≤ 2**31 - 1) and never turns into tensors;
* model size: the real modules the pages build (MLA measured run, MoE router) stay CPU-sized at the largest
  knobs *and* for absurd-but-valid uploaded config.json files; the MoE page says when it caps a model;
* training lab (when its page exists): steps / tokens / wall-time caps, and one run at a time per server;
* caches: every `st.cache_data` / `st.cache_resource` in app/ and pages/ has `max_entries` or `ttl` (or takes no
  argument), every `functools.lru_cache` has a `maxsize`; the worst-case footprint of the heavy caches is
  estimated from their largest entries and must fit a budget;
* determinism: the same link (preset, knobs, seed) gives identical chart data and numbers in two fresh server
  processes with different hash seeds, for every page (wall-clock charts excluded, and listed).
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
sys.path.insert(0, str(ROOT))

from apptest_helpers import HANG_S  # noqa: E402
from apptest_helpers import open_page as _open_page  # noqa: E402
from core.published import PUBLISHED_CONFIGS  # noqa: E402

V3 = PUBLISHED_CONFIGS["deepseek-v3"]
M = 2**31 - 1


def pages() -> list[str]:
    from app.pages import PAGES
    return [p.path for p in PAGES]


def open_page(page: str, query: dict | None = None) -> AppTest:
    return _open_page(page, query)


def clean(at: AppTest, what: str = "") -> None:
    assert not at.exception, (what, [e.value for e in at.exception])


# ---------------------------------------------------------------- knob ranges
# Numeric inputs allowed without an upper bound: formula-only (never sized into tensors) and validated by core.
UNBOUNDED_OK = {
    **{k: "Overview custom-architecture override: calculator only; core.config caps every size at 2**31 - 1"
       for k in ("ov_num_hidden_layers", "ov_hidden_size", "ov_num_attention_heads", "ov_kv_lora_rank",
                 "ov_q_lora_rank", "ov_qk_rope_head_dim", "ov_intermediate_size", "ov_first_k_dense_replace",
                 "ov_n_routed_experts", "ov_n_shared_experts", "ov_num_experts_per_tok", "ov_moe_intermediate_size",
                 "ov_n_group", "ov_topk_group", "ov_vocab_size", "ov_num_nextn_predict_layers")},
    "fp8_val": "one scalar rounded to FP8 (bit layout)",
}


@pytest.mark.parametrize("page", pages())
def test_every_numeric_knob_is_bounded(page):
    at = open_page(page)
    clean(at, page)
    unbounded = []
    for w in at.number_input:
        if not (w.proto.has_min and w.proto.has_max) and w.key not in UNBOUNDED_OK:
            unbounded.append(w.key or w.label)
    for w in at.slider:
        assert w.proto.max - w.proto.min < 1e7, (w.key, "a slider with a huge range")
    for w in list(at.select_slider) + list(at.selectbox) + list(at.radio):
        assert len(w.options) <= 64, (w.key, "too many options to fuzz/serve")
    assert not unbounded, f"{page}: numeric knobs without a max (cap them, or justify in UNBOUNDED_OK): {unbounded}"


# ---------------------------------------------------------------- model-size caps
ABSURD = {
    "kv_lora_rank 2**31-1": dict(V3, kv_lora_rank=M),
    "q_lora_rank 2**31-1": dict(V3, q_lora_rank=M),
    "head dims 2**31-1": dict(V3, v_head_dim=M, qk_nope_head_dim=M),
    "rope dim 2**31-2": dict(V3, qk_rope_head_dim=M - 1),
    "heads 2**31-1 (prime)": dict(V3, num_attention_heads=M, num_key_value_heads=M),
    "experts 2**31-1": dict(V3, n_routed_experts=M, n_group=1, topk_group=1),
    "hidden 2**31-1": dict(V3, hidden_size=M),
    "vocab 2**31-1": dict(V3, vocab_size=M),
    "layers 10000": dict(V3, num_hidden_layers=10_000),
    "all ones": dict(V3, hidden_size=1, num_attention_heads=1, num_key_value_heads=1, kv_lora_rank=1, q_lora_rank=None,
                     qk_rope_head_dim=2, qk_nope_head_dim=1, v_head_dim=1, n_routed_experts=1, num_experts_per_tok=1,
                     n_group=1, topk_group=1, num_hidden_layers=1, first_k_dense_replace=0, moe_intermediate_size=1,
                     intermediate_size=1, vocab_size=1, n_shared_experts=0),
}
MEASURE_PARAM_CAP = 2_000_000  # the measured MLA module (and its MHA baseline) stays a few MB


def _measured_params(cfg_json: str) -> int:
    import torch

    from app import compute
    from core.attention import MLA, GroupedQueryAttention
    small = compute.common.cfg_of(compute.mla.scaled_down(cfg_json))
    with torch.device("meta"):
        n = sum(p.numel() for p in MLA(small).parameters())
        n += sum(p.numel() for p in GroupedQueryAttention(small.replace(attention_type="mha")).parameters())
    return n


def test_measured_mla_module_is_capped_for_any_config():
    from app import compute
    from core.config import ModelConfig
    largest = compute.mla.mla_arch(json.dumps(V3), kv_lora_rank=4096, qk_rope_head_dim=256, num_attention_heads=256,
                                   v_head_dim=256, qk_nope_head_dim=256, q_lora_rank=3072, num_hidden_layers=128,
                                   num_key_value_heads=256)
    sizes = {"largest knobs": _measured_params(largest)}
    for name, d in ABSURD.items():
        sizes[name] = _measured_params(json.dumps(ModelConfig.from_hf(d).to_hf()))
    assert max(sizes.values()) <= MEASURE_PARAM_CAP, sizes


@pytest.mark.parametrize("name", list(ABSURD))
def test_absurd_but_valid_uploads_render_every_page(name):
    """A config.json core accepts (sizes up to 2**31 - 1) must not make any page allocate hundreds of GB (before
    the cap, kv_lora_rank 2**31-1 asked torch for 275 GB on the MLA page and 2**31-1 experts 550 GB on MoE)."""
    at = AppTest.from_file(APP, default_timeout=HANG_S).run()
    at.get("file_uploader")[0].upload("config.json", json.dumps(ABSURD[name]).encode(), "application/json")
    at.run()
    clean(at, name)
    assert at.selectbox(key="model").value == "uploaded", [e.value for e in at.error]
    for page in pages():  # bounded work: the parameter caps above, not a stopwatch (a loaded machine is slow)
        at.switch_page(page).run()
        clean(at, f"{name} on {page}")
        if page == "pages/moe.py" and ABSURD[name]["n_routed_experts"] > 512:
            assert any("512" in i.value and "cap" in i.value for i in at.info), "the MoE cap must be reported"
            assert at.select_slider(key="moe_experts").value == 512


def test_largest_knobs_of_every_page_render():
    """Every page at the top of every knob range at once (bounded work, no exception, errors are readable)."""
    for page in pages():
        at = open_page(page)
        q = {}
        for w in at.select_slider:
            if w.proto.query_param_key and not w.proto.disabled:
                q[w.proto.query_param_key] = w.options[-1]
        for w in at.slider:
            if w.proto.query_param_key and not w.proto.disabled:
                q[w.proto.query_param_key] = str(int(w.proto.max) if float(w.proto.max).is_integer() else w.proto.max)
        at = open_page(page, q)
        clean(at, f"{page} at {q}")
        for e in at.error:
            assert "Traceback" not in e.value and e.value.strip(), e.value


# ---------------------------------------------------------------- training lab caps (once the page exists)
def _lab():
    if "pages/training.py" not in pages():
        pytest.skip("the training lab page is not in the navigation yet")
    from app.lab import knobs, session
    return knobs, session


def test_training_caps_hold_for_every_knob_combination():
    knobs, session = _lab()
    steps_opts = knobs.KNOBS["tr_steps"].options
    assert max(steps_opts) <= knobs.MAX_STEPS, "a Steps option above the server's cap"
    assert knobs.MAX_SECONDS <= 600 and knobs.MAX_TOKENS <= 5_000_000 and knobs.MAX_STEPS <= 5_000
    ok = refused = 0
    for steps in steps_opts:
        for batch in knobs.KNOBS["tr_batch"].options:
            for seq in knobs.KNOBS["tr_seq"].options:
                try:
                    _, cfg = knobs.lab_config({"tr_steps": steps, "tr_batch": batch, "tr_seq": seq}, seed=0)
                except knobs.LabConfigError as e:
                    assert e.knob and e.rule, e
                    refused += 1
                    continue
                ok += 1
                assert cfg.steps <= knobs.MAX_STEPS
                assert cfg.steps * cfg.batch_size * cfg.seq_len <= knobs.MAX_TOKENS
                assert 0 < cfg.max_time_s <= knobs.MAX_SECONDS
    assert ok and refused, (ok, refused)


def test_training_page_reports_its_caps_and_refuses_over_cap_runs():
    knobs, session = _lab()
    at = open_page("pages/training.py")
    clean(at)
    caps = " ".join(c.value for c in at.sidebar.caption)
    assert str(knobs.MAX_STEPS) in caps and f"{knobs.MAX_TOKENS:,}" in caps, caps
    big = {"tr_steps": str(max(knobs.KNOBS["tr_steps"].options)), "tr_batch": str(max(knobs.KNOBS["tr_batch"].options)),
           "tr_seq": str(max(knobs.KNOBS["tr_seq"].options))}
    at = open_page("pages/training.py", big)
    clean(at)
    msg = " ".join(e.value for e in at.error)
    assert "tokens" in msg and f"{knobs.MAX_TOKENS:,}" in msg, msg
    assert at.button(key="tr_start").proto.disabled, "Start must be disabled while the run is over the cap"


def test_one_training_run_at_a_time_per_server(monkeypatch):
    knobs, session = _lab()
    from app.lab import manager as runs
    monkeypatch.setattr(runs, "STALE_AFTER_S", HANG_S)  # session A is not polled while B runs: never "went away"
    mgr = session.manager()
    if not all(hasattr(mgr, a) for a in ("busy", "cancel")):
        pytest.skip("RunManager API changed (busy/cancel)")
    assert mgr.busy() is None, "a run is already active in this process"
    long = {"tr_steps": "400", "tr_batch": "8", "tr_seq": "64"}
    a = open_page("pages/training.py", long)
    a.button(key="tr_start").click().run()
    clean(a, "session A start")
    try:
        run = mgr.busy()
        assert run is not None, "session A's run did not start"
        b = open_page("pages/training.py", {**long, "tr_lr": "0.01"})  # other knobs (the same would join A's run)
        clean(b, "session B")
        text = " ".join(w.value for w in b.warning)
        assert "busy" in text.lower(), text
        b.button(key="tr_start").click().run()
        clean(b, "session B start")
        assert mgr.busy() is run, "a second run started while one was active"
        assert "not started" in " ".join(w.value for w in b.warning).lower()
        c = open_page("pages/training.py", long)  # A's knobs: C follows A's run, still one run on the server
        c.button(key="tr_start").click().run()
        clean(c, "session C start")
        assert mgr.busy() is run and c.session_state["_tr_run"] is run and not mgr.queue
    finally:
        if mgr.busy() is not None:
            mgr.cancel(mgr.busy())
        t0 = time.time()
        while mgr.busy() is not None and time.time() - t0 < HANG_S:
            time.sleep(0.2)
    assert mgr.busy() is None, "the cancelled run did not stop"


# ---------------------------------------------------------------- bounded caches
CACHE_DIRS = ("app", "pages")


def _cache_sources():
    files = [ROOT / "streamlit_app.py"] + [p for d in CACHE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    files += sorted((ROOT / "core").rglob("*.py"))
    return files


def _is_cache(node) -> str | None:
    target = node.func if isinstance(node, ast.Call) else node
    name = ast.unparse(target)
    for n in ("cache_data", "cache_resource", "lru_cache", "functools.cache"):
        if name.endswith(n):
            return n
    if name in ("cache", "functools.cache"):
        return "functools.cache"
    return None


def test_every_cache_is_bounded():
    found, offenders = [], []
    for path in _cache_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for dec in fn.decorator_list:
                kind = _is_cache(dec)
                if kind is None:
                    continue
                where = f"{path.relative_to(ROOT)}:{dec.lineno} {fn.name}"
                found.append(where)
                kw = {k.arg: k.value for k in dec.keywords} if isinstance(dec, ast.Call) else {}
                n_args = len(fn.args.args) + len(fn.args.posonlyargs) + len(fn.args.kwonlyargs)
                singleton = n_args == 0 and not fn.args.vararg and not fn.args.kwarg
                if kind == "functools.cache":
                    offenders.append(f"{where}: functools.cache is unbounded")
                elif kind == "lru_cache":
                    size = kw.get("maxsize", ast.Constant(128) if isinstance(dec, ast.Call) and not dec.args else
                                  (dec.args[0] if isinstance(dec, ast.Call) and dec.args else ast.Constant(128)))
                    if isinstance(size, ast.Constant) and size.value is None:
                        offenders.append(f"{where}: lru_cache(maxsize=None)")
                elif not singleton and not any(k in kw and not (isinstance(kw[k], ast.Constant) and kw[k].value is None)
                                               for k in ("max_entries", "ttl")):
                    offenders.append(f"{where}: st.{kind} without max_entries/ttl")
    assert len(found) >= 10, found
    assert not offenders, offenders


def _app_caches():
    """(name, cached function) for every st.cache_data / st.cache_resource object in the app/ modules."""
    import importlib
    import pkgutil

    import app
    for m in pkgutil.walk_packages(app.__path__, "app."):  # packages too (app.compute.mla, app.charts.moe, …)
        mod = importlib.import_module(m.name)
        for name, obj in vars(mod).items():
            if getattr(obj, "_info", None) is not None:
                yield f"{m.name}.{name}", obj


def _takes_arguments(info) -> bool:
    import inspect
    return bool(inspect.signature(inspect.unwrap(info.func)).parameters)  # through app.memory.heavy's wrapper


def test_cached_functions_report_their_bounds_at_runtime():
    """The same, on the imported objects (catches caches created by calling st.cache_data(fn) directly): every
    st.cache_data that takes arguments has max_entries (a ttl alone does not bound a burst: Streamlit only reaps
    expired entries on the cache's next write)."""
    seen = 0
    for where, obj in _app_caches():
        info = obj._info
        if not hasattr(info, "max_entries"):  # st.cache_resource: checked statically above
            continue
        seen += 1
        if _takes_arguments(info):
            assert info.max_entries, f"{where}: st.cache_data without max_entries"
            assert info.max_entries <= 512, f"{where}: max_entries {info.max_entries}"
    assert seen >= 10


# The server process's share of a 690 MB (lowest Community Cloud tier) container: ~400 MiB after every page was
# visited once (torch, pandas/pyarrow, streamlit, plotly imports ~330 MiB), two heavy computations in flight at most
# (app.memory: ~75 MB each), and what the caches may keep. By max_entries alone the caches below allowed 313 MB.
CACHE_BUDGET_MB = 96


def _cache_bound_mb(fn, largest_mb: float) -> float:
    """Worst case of one st.cache_data in MB: max_entries × its largest entry, capped by its byte budget max_size
    (Streamlit evicts least-recently-used entries past it; a single entry larger than the budget is still kept)."""
    info = fn._info
    worst = info.max_entries * largest_mb
    if info.max_size_bytes:
        worst = min(worst, max(info.max_size_bytes / 1e6, largest_mb))
    return worst


def test_worst_case_cache_footprint_fits_the_budget():
    """Σ worst case (max_entries × pickled size of the largest entry, capped by max_size) for the caches whose entries
    grow with the knobs. (st.cache_data keeps each entry pickled; the ~10 small caches are below 0.1 MB per entry.)"""
    from app import charts, compute, ui
    v3 = json.dumps(V3, sort_keys=True)
    raw = lambda f: f._info.func  # noqa: E731
    moe, mla, fp8 = compute.moe, compute.mla, compute.fp8
    key = moe.routing_key(moe.moe_arch(v3, n_routed_experts=512, num_experts_per_tok=16, n_group=16, topk_group=16))
    sim = raw(moe.moe_simulation)(512, 16, 16, 16, "sigmoid", 0.1, 1.0, 240, 2.0, 0)
    small = mla.scaled_down(mla.mla_arch(v3, num_attention_heads=256, num_key_value_heads=256))
    entries = {
        "moe_simulation": (moe.moe_simulation, sim),
        "moe_routing": (moe.moe_routing, raw(moe.moe_routing)(key, 0, 2.0, 0.1, 240)),
        "attention_map": (mla.attention_map, raw(mla.attention_map)(small, 0)),
        "fp8_quantize": (fp8.fp8_quantize, raw(fp8.fp8_quantize)("e4m3", "mx", "saturate", "outliers", 64, 1e6, 0)),
        "ui figure (512-expert heatmap)": (ui._cached_figure, raw(ui._cached_figure)(
            "expert_load_heatmap", charts.moe.expert_load_heatmap, sim["per_strategy"]["aux_free"]["relative_load"],
            label="x", height=420, width_chars=85)),
    }
    rows, total = [], 0.0
    for name, (fn, value) in entries.items():
        mb = len(pickle.dumps(value)) / 1e6
        worst = _cache_bound_mb(fn, mb)
        total += worst
        cap = f", max_size {fn._info.max_size_bytes / 1e6:.0f} MB" if fn._info.max_size_bytes else ""
        rows.append(f"{name}: {mb:.2f} MB × {fn._info.max_entries}{cap} -> {worst:.0f} MB")
    print("\n".join(rows) + f"\nworst case total {total:.0f} MB (budget {CACHE_BUDGET_MB} MB)")
    assert total <= CACHE_BUDGET_MB, rows


def test_figure_cache_is_bounded_in_entries_and_bytes():
    """The shared plotly-figure cache (app.ui.fig): a byte budget, not only a count. A 512-expert × 240-step heatmap
    pickles to ~0.66 MB, so 256 of them were 168 MB; the budget holds dozens of those and every typical figure."""
    from app import ui
    info = ui._cached_figure._info
    assert info.max_entries and info.max_entries <= 256, info.max_entries
    assert info.max_size_bytes and info.max_size_bytes <= 32 * 2**20, info.max_size_bytes
    assert info.max_size_bytes >= 24 * 0.66e6, "too small to hold the figures of a few heavy views"


def test_caches_whose_entries_grow_with_the_knobs_have_a_byte_budget():
    """Entries that reach megabytes at the largest knobs (MoE routing 2 MB, bias simulation 4 MB, figures 0.66 MB)
    are capped in bytes, at most 32 MiB each."""
    from app import compute, ui
    for fn in (compute.moe.moe_routing, compute.moe.moe_simulation, ui._cached_figure):
        b = fn._info.max_size_bytes
        assert b and b <= 32 * 2**20, (fn._info.display_name, b)


def _torch_work(fn) -> bool:
    """Does the cached function build tensors (directly or through the page helpers that do)?"""
    import inspect
    src = inspect.getsource(inspect.unwrap(fn._info.func))
    return any(w in src for w in ("torch", "_modules(", "_test_tensor(", "_router_setup(", "simulate_bias_controller"))


def test_heavy_computations_share_a_bounded_gate():
    """Every cached computation that builds tensors runs under app.memory.heavy (at most HEAVY_CONCURRENCY at
    once per server: each holds tens of MB of temporaries while it runs)."""
    from app import compute, memory
    assert 1 <= memory.HEAVY_CONCURRENCY <= 2
    heavy = {w: fn for w, fn in _app_caches() if w.startswith("app.compute.") and _torch_work(fn)}
    assert len(heavy) >= 8 and "app.compute.moe.moe_routing" in heavy, list(heavy)
    ungated = [w for w, fn in heavy.items() if not getattr(fn._info.func, "heavy", False)]
    assert not ungated, f"cached tensor work outside app.memory.heavy: {ungated}"
    assert not getattr(compute.overview.overview._info.func, "heavy", False), "closed-form calculators need no gate"


def test_server_keeps_torch_gemms_unless_the_operator_chooses(monkeypatch):
    """oneDNN caches a ~0.5 MB kernel per GEMM shape and the pages' shapes follow the knobs, so the server's
    computations use torch's fp32 GEMMs (no per-shape memory) unless EVA_FP32_GEMM says otherwise."""
    from app.compute import common
    from core import gemm
    monkeypatch.delenv("EVA_FP32_GEMM", raising=False)
    monkeypatch.setattr(common, "_TORCH_READY", False)
    monkeypatch.setattr(gemm, "_backend", None)
    common.torch_setup()
    assert gemm.fp32_backend() == "torch"
    monkeypatch.setenv("EVA_FP32_GEMM", "onednn")
    monkeypatch.setattr(common, "_TORCH_READY", False)
    monkeypatch.setattr(gemm, "_backend", None)
    common.torch_setup()
    assert gemm._backend is None  # untouched: core.gemm resolves the operator's choice at the first GEMM


def test_heavy_gate_admits_at_most_its_limit_and_is_reentrant():
    import threading

    from app import memory
    n = memory.HEAVY_CONCURRENCY
    inside, most, lock, release = [0], [0], threading.Lock(), threading.Event()

    @memory.heavy
    def work():
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        release.wait(30)
        with lock:
            inside[0] -= 1

    threads = [threading.Thread(target=work, daemon=True) for _ in range(n + 3)]
    for t in threads:
        t.start()
    for _ in range(300):  # until the gate is full (bounded wait; no timing is asserted)
        if inside[0] >= n:
            break
        release.wait(0.01)
    release.wait(0.3)  # give a broken gate the chance to let more in
    assert most[0] == n, (most[0], n)
    release.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and most[0] == n

    @memory.heavy
    def inner():
        return "inner"

    @memory.heavy
    def outer():
        return inner()

    hold, done, held = threading.Event(), [], []

    @memory.heavy
    def block():
        held.append(1)
        hold.wait(30)

    blockers = [threading.Thread(target=block, daemon=True) for _ in range(n - 1)]
    for t in blockers:
        t.start()
    for _ in range(300):  # every other slot taken before the nested call starts
        if len(held) == n - 1:
            break
        hold.wait(0.01)
    runner = threading.Thread(target=lambda: done.append(outer()), daemon=True)
    runner.start()
    runner.join(20)  # with every other slot taken, a nested heavy call must not wait for one
    hold.set()
    for t in blockers:
        t.join(30)
    assert done == ["inner"], "a heavy function calling another one deadlocked on the gate"


def test_memory_percentages_are_right_for_absurd_uploads():
    """Overview 'FP8 weights need x% of BF16' / 'KV cache is y% of MHA' with byte counts near 1e17-1e26: the numpy
    int64 product 100 * bytes wrapped around (hidden_size 2**31-1 showed 4% instead of 50%)."""
    from app import charts, compute
    from core.config import ModelConfig
    for name, d in ABSURD.items():
        cfg_json = json.dumps(ModelConfig.from_hf(d).to_hf(), sort_keys=True)
        mem = compute.overview.overview._info.func(cfg_json, 2**20, "bf16")["memory"]
        bf16, fp8, kv, mha = (int(b) for b in mem["bytes"])  # exact Python ints
        title = charts.overview.memory_bars(mem).layout.title
        assert f"need {100 * fp8 / bf16:.0f}% of BF16" in title.text, (name, title.text)
        if mha and kv != mha:
            assert f"{100 * kv / mha:.1f}% of what MHA" in title.subtitle.text, (name, title.subtitle.text)


# ---------------------------------------------------------------- determinism (issue item 6, app side)
WALL_CLOCK_WORDS = ("latency", "ms per", "tokens/s", "seconds", "wall", "elapsed")

_DIGEST = textwrap.dedent(r'''
    import hashlib, json, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {root!r} + "/tests")
    import apptest_helpers  # noqa: F401  (the component scan once for this process's six AppTests)
    from streamlit.testing.v1 import AppTest
    from app.pages import PAGES
    out = {{}}
    for p in PAGES:
        at = AppTest.from_file({app!r}, default_timeout={hang!r})
        at.query_params.update({query!r})
        at.switch_page(p.path)
        at.run()
        charts, skipped = {{}}, []
        for c in at.get("plotly_chart"):
            spec = json.loads(c.proto.spec)
            lay = spec.get("layout", {{}})
            words = json.dumps([lay.get("title"), lay.get("xaxis", {{}}).get("title"),
                                lay.get("yaxis", {{}}).get("title")]).lower()
            key = c.proto.id.split("-")[-1]
            if any(w in words for w in {wall!r}):
                skipped.append(key)
                continue
            charts[key] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        metrics = [(m.label, m.value) for m in at.metric if not any(w in m.label.lower() for w in {wall!r})]
        out[p.path] = {{"charts": charts, "skipped": skipped, "metrics": metrics,
                        "exceptions": [e.value for e in at.exception], "errors": [e.value for e in at.error]}}
    print("DIGEST" + json.dumps(out))
''')


def test_same_link_gives_identical_chart_data_in_fresh_processes():
    query = {"model": "deepseek-v2-lite", "seed": "7", "lesson": "true", "mla_dc": "256", "moe_topk": "4",
             "fp8_data": "heavy_tail", "ov_ctx": "32K"}
    code = _DIGEST.format(root=str(ROOT), app=APP, query=query, wall=WALL_CLOCK_WORDS, hang=HANG_S)
    procs = []
    for hashseed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=len(pages()) * HANG_S)
        assert p.returncode == 0, se[-3000:]
        line = next(ln for ln in so.splitlines() if ln.startswith("DIGEST"))
        outs.append(json.loads(line[len("DIGEST"):]))
    a, b = outs
    assert set(a) == set(pages())
    for page in a:
        assert not a[page]["exceptions"], (page, a[page]["exceptions"])
        assert a[page]["charts"] == b[page]["charts"], f"{page}: chart data differ between two fresh processes"
        assert a[page]["metrics"] == b[page]["metrics"], f"{page}: numbers differ"
        assert a[page]["errors"] == b[page]["errors"]
    assert sum(len(v["charts"]) for v in a.values()) >= 10, "too few charts compared"
    skipped = {p: v["skipped"] for p, v in a.items() if v["skipped"]}
    assert sum(len(v) for v in skipped.values()) <= 2, f"too many charts excluded as wall-clock: {skipped}"
    print("wall-clock charts not compared:", skipped)


def test_training_worker_keeps_freed_pages_until_trimmed():
    """The lab worker's malloc settings (`app.memory.keep_freed_pages`): what a training step frees stays in the
    process for the next step (no page faulted in again), and `trim()` after the job still returns it to the OS
    (the idle worker's footprint). In a fresh process: the settings are process-wide."""
    code = textwrap.dedent("""
        import resource
        import torch
        from app.memory import keep_freed_pages, trim
        kept = keep_freed_pages()
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
        faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        def step():  # 64 MiB of 1 MiB buffers, allocated, written and freed, as a step's activations are
            xs = [torch.ones(256, 1024) for _ in range(64)]
            del xs
        step()
        step()  # the second step still touches some pages for the first time (up to ~2k faults seen): not measured
        f0 = faults()
        for _ in range(5):
            step()
        refaulted = faults() - f0
        held = rss()
        trim()
        print(kept, refaulted, held - rss())
    """)
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc (Linux)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    kept, refaulted, returned = out.stdout.split()
    if kept != "True":
        pytest.skip("not glibc: keep_freed_pages does nothing")
    # 5 steps x 64 MiB would be 80k pages faulted in again with glibc's defaults
    assert int(refaulted) < 2000, f"{refaulted} pages faulted in again"
    assert int(returned) > 48 * 2**20, f"trim() returned only {int(returned) / 2**20:.0f} MiB"
