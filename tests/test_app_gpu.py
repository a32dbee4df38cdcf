"""The measured GPU figures in the app: the FP8 and MLA pages show them labelled with device and date from
docs/gpu_results.json, the chart builders draw exactly the committed numbers, and a missing or malformed file
gives a message instead of a traceback."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app import gpu_view, palette
from app.charts import gpu as charts
from apptest_helpers import HANG_S, open_page
from core.cuda import results

RES = results.load_gpu_results()
pytestmark = pytest.mark.skipif(RES is None, reason="docs/gpu_results.json not committed")


def _specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


@pytest.mark.parametrize("page, heading, title_start", [
    ("pages/fp8.py", "Measured on a GPU: FP8 vs bf16", "FP8 is faster than bf16"),
    ("pages/mla.py", "Measured on a GPU: absorbed vs naive decode", "At 32K context the absorbed path"),
])
def test_page_shows_the_measured_section_with_its_label(page, heading, title_start):
    at = open_page(page)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error and not at.warning, [e.value for e in [*at.error, *at.warning]]
    assert heading in [s.value for s in at.subheader]
    label = results.label(RES)
    assert any(label in c.value for c in at.caption), "device · versions · date label missing"
    titles = [s["layout"]["title"]["text"].replace("<br>", " ") for s in _specs(at)]
    assert any(t.startswith(title_start) for t in titles), titles
    csv_keys = {b.key for b in at.get("download_button")}
    assert {"csv_gpu_fp8", "csv_gpu_lossgap"} <= csv_keys if "fp8" in page else "csv_gpu_decode" in csv_keys


def test_fp8_page_states_each_target_verdict_and_the_limit():
    at = open_page("pages/fp8.py")
    captions = " ".join(c.value for c in at.caption)
    df = gpu_view.fp8_frame(results.fp8_rows(RES))
    for _, row in df[df["target"].notna()].iterrows():  # each target's verdict, as the results decide it
        verdict = "met" if row["speedup"] >= row["target"] else "missed"
        assert f"Target: **≥ {row['target']:g}× — {verdict}**" in captions
    verdict = gpu_view.loss_gap_verdict(results.lossgap_row(RES), gpu_view.TARGET_LOSS_GAP)
    assert f"Target: **within 1% — {verdict}**" in captions
    text = " ".join(m.value for m in at.markdown)
    assert "What limits FP8 here" in text and "transposed" in text
    fused = any(r.get("fused_quantizers_ran") for r in RES["gemm"])
    assert ("fused kernel" if fused else "quantized") in text  # the limit named from the results, not typed in


def test_mla_page_explains_batch_one():
    at = open_page("pages/mla.py")
    text = " ".join(m.value for m in at.markdown)
    assert "Why batch 1 gains little" in text
    rows = pd.DataFrame(results.decode_rows(RES))
    one = rows[rows["batch"] == 1]
    t = pd.concat([one["absorbed_ms"], one["naive_ms"]])
    assert f"{t.min():.2f}–{t.max():.2f} ms" in text  # the measured per-step times, not a typed-in figure


def test_fp8_frame_puts_targets_on_the_largest_shape_and_config():
    df = gpu_view.fp8_frame(results.fp8_rows(RES))
    lin, step = df[df["kind"] == "linear"], df[df["kind"] == "step"]
    big = (lin["m"] * lin["k"] * lin["n"]).idxmax()
    assert df.loc[big, "target"] == gpu_view.TARGET_FP8_LINEAR
    largest = step[step["params"] == step["params"].max()]  # the largest config, at each batch measured
    assert len(largest) >= 1 and (df.loc[largest.index, "target"] == gpu_view.TARGET_FP8_STEP).all()
    assert df["target"].notna().sum() == 1 + len(largest)  # nothing else carries a target
    assert gpu_view.fp8_frame([]).empty


def test_a_ratio_just_under_its_target_never_reads_as_met():
    """Two decimals would print 1.399× as "1.40×" beside a 1.4× target the page calls missed: the chart's bars and
    title use the cards' rule (`ratio_text`, test below), and rows without a target keep two decimals."""
    assert gpu_view.ratio_text(1.396, float("nan")) == "1.40×"  # no target on the row: two decimals
    df = gpu_view.fp8_frame(results.fp8_rows(RES))
    row = df.loc[df["target"] == gpu_view.TARGET_FP8_LINEAR].iloc[0]
    fig = charts.fp8_speedup_bars(df)
    label = gpu_view.ratio_text(row["speedup"], row["target"])
    assert label in fig.data[0].text
    if row["speedup"] == df["speedup"].max():
        assert f"at best {label}" in fig.layout.title.text.replace("<br>", " ")


def test_fp8_speedup_bars_draw_the_committed_ratios():
    df = gpu_view.fp8_frame(results.fp8_rows(RES))
    fig = charts.fp8_speedup_bars(df)
    bars, gemm, target = fig.data
    assert list(bars.x) == list(df["speedup"][::-1])  # every row, slower-than-bf16 ones included
    assert bars.marker.color == palette.FORMATS["fp8"]
    assert sorted(gemm.x) == sorted(df["gemm_only_speedup"].dropna())
    assert sorted(target.x) == sorted(df["target"].dropna())
    n_fast = int((df["speedup"] > 1).sum())
    title = fig.layout.title.text.replace("<br>", " ")
    assert f"only {n_fast} of {len(df)} measurements" in title
    assert f"{df['gemm_only_speedup'].max():.2f}×" in title
    assert fig.layout.xaxis.title.text == "Speed-up of FP8 over bf16 (×)"
    assert "ms" in bars.hovertemplate


def test_fp8_loss_gap_shows_both_losses_and_the_verdict():
    row = results.lossgap_row(RES)
    fig = charts.fp8_loss_gap(row, gpu_view.TARGET_LOSS_GAP)
    bf, f8, *again = fig.data
    ys = [y for t in fig.data for y in t.y]
    assert len(again) == bool(row["repeat_gaps"])  # the control's repeats, where the file has them
    if again:
        assert [a / b - 1 for a, b in zip(again[0].y, bf.y)] == pytest.approx(list(row["repeat_gaps"].values()))
    assert bf.y[0] == row["bf16_val_loss"] and f8.y[0] == row["fp8_val_loss"]  # the first seed's pair first
    assert len(bf.y) == len(f8.y) == max(1, len(row["seed_gaps"]))
    assert row["recipe"] in f8.name
    title = fig.layout.title.text.replace("<br>", " ")
    gap = row["mean_relative_gap"] if len(row["seed_gaps"]) > 1 else row["relative_gap"]
    assert f"{100 * gap:+.2f}%" in title
    phrase = {"within": "within the 1% target", "outside": "outside the 1% target",
              "unresolved": "cannot tell whether it is within 1%", "one run": "no noise estimate"}
    assert phrase[results.gap_verdict(row, gpu_view.TARGET_LOSS_GAP)] in title
    lo, hi = fig.layout.yaxis.range  # zoomed so a 1% gap is visible, with both points and the band inside
    assert lo < min(ys) and hi > max(max(ys), row["bf16_val_loss"] * (1 + gpu_view.TARGET_LOSS_GAP))
    assert "nats/byte" in fig.layout.yaxis.title.text


def _seeded(losses: dict) -> dict:
    """A results file whose lossgap section ran several seeds: {seed: (bf16 val loss, FP8 val loss)}."""
    seeds = {str(k): {"bf16": {"val_loss": b, "seconds": 15.0}, "deepseek": {"val_loss": f, "seconds": 25.0},
                      "relative_gap": f / b - 1} for k, (b, f) in losses.items()}
    bf = [b for b, _ in losses.values()]
    first = seeds[str(min(losses))]
    return {"lossgap": {"config": "100M", "steps": 300, "batch": 16, "seq_len": 512, "lr": 3e-4, "seeds": seeds,
                        "bf16": first["bf16"], "deepseek": first["deepseek"], "relative_gap": first["relative_gap"],
                        "bf16_seed_spread": (max(bf) - min(bf)) / min(bf),
                        "mean_relative_gap": sum(s["relative_gap"] for s in seeds.values()) / len(seeds)}}


def test_loss_gap_over_seeds_is_read_against_the_seed_noise():
    """Several seeds: one point pair per seed, the mean gap and its 95% interval in the title; no verdict while the
    interval crosses the target's bound (the runs cannot decide it), "met" / "missed" once it lies inside / beyond."""
    noisy = results.lossgap_row(_seeded({0: (1.27, 1.265), 1: (1.211, 1.173), 2: (1.246, 1.2475)}))
    fig = charts.fp8_loss_gap(noisy, gpu_view.TARGET_LOSS_GAP)
    assert [len(t.y) for t in fig.data] == [3, 3] and list(fig.data[0].x) == ["seed 0", "seed 1", "seed 2"]
    title = fig.layout.title.text.replace("<br>", " ")
    assert f"{100 * noisy['mean_relative_gap']:+.2f}%" in title and "mean of 3 seeds" in title
    lo, hi = noisy["gap_interval"]
    assert f"95% interval {100 * lo:+.2f}% … {100 * hi:+.2f}%" in title and "3 seeds cannot tell" in title
    assert gpu_view.loss_gap_verdict(noisy, gpu_view.TARGET_LOSS_GAP).startswith("not resolvable with 3 seeds")
    # four seeds that agree: FP8 ~0.5% worse each time -> the interval lies inside +-1%
    quiet = results.lossgap_row(_seeded({0: (1.250, 1.256), 1: (1.252, 1.2585), 2: (1.248, 1.2545),
                                         3: (1.251, 1.2575)}))
    assert results.gap_verdict(quiet, gpu_view.TARGET_LOSS_GAP) == "within"
    assert gpu_view.loss_gap_verdict(quiet, gpu_view.TARGET_LOSS_GAP) == "met"
    assert "within the 1% target" in charts.fp8_loss_gap(quiet, gpu_view.TARGET_LOSS_GAP).layout.title.text.replace(
        "<br>", " ")
    worse = results.lossgap_row(_seeded({0: (1.25, 1.29), 1: (1.26, 1.30), 2: (1.24, 1.28)}))  # ~3% every seed
    assert gpu_view.loss_gap_verdict(worse, gpu_view.TARGET_LOSS_GAP) == "missed"
    one = results.lossgap_row(_seeded({0: (1.25, 1.255)}))
    assert one["gap_interval"] is None and gpu_view.loss_gap_verdict(one, gpu_view.TARGET_LOSS_GAP).endswith(
        "(one seed: no noise estimate)")


def test_decode_throughput_has_one_panel_per_batch_and_the_ratios():
    df = pd.DataFrame(results.decode_rows(RES))
    fig = charts.decode_throughput(df)
    assert len(fig.data) == 2 * df["batch"].nunique()
    for tr in fig.data:
        b = int(tr.hovertemplate.split("batch ")[1].split("<br>")[0])
        d = df[df["batch"] == b].sort_values("context")
        kind = "absorbed" if tr.name.startswith("absorbed") else "naive"
        assert list(tr.y) == list(d[f"{kind}_tokens_per_s"])
        assert tr.line.color == palette.ATTENTION["MLA" if kind == "absorbed" else "MLA (naive)"]
        if kind == "absorbed":
            assert list(tr.text) == [f"{s:.1f}×" for s in d["speedup"]]
    top = df[(df["context"] == df["context"].max()) & (df["batch"] == df["batch"].max())].iloc[0]
    assert f"{top['speedup']:.1f}× faster" in fig.layout.title.text.replace("<br>", " ")
    assert fig.layout.yaxis.type == "log" and "tokens/s" in fig.layout.yaxis.title.text


def _section(which: str, path: str) -> None:
    from app import gpu_view as v
    getattr(v, which)(path=path)


@pytest.mark.parametrize("which", ["fp8_section", "mla_section", "train_section"])
def test_missing_and_malformed_files_give_a_message(tmp_path, which):
    missing = AppTest.from_function(_section, args=(which, str(tmp_path / "none.json")), default_timeout=HANG_S).run()
    assert not missing.exception and "is not there" in missing.info[0].value
    cases = {"bad.json": "{not json",  # not JSON
             "nometa.json": json.dumps({"gemm": []}),  # no meta block
             "fields.json": json.dumps({"meta": {"device": "X", "date": "2026-12-01"},  # rows lack fields
                                        "gemm": [{"m": 1}], "decode": [{"context": 1}]})}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        at = AppTest.from_function(_section, args=(which, str(tmp_path / name)), default_timeout=HANG_S).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        assert at.warning and name in at.warning[0].value and "cannot be shown" in at.warning[0].value, name


def test_a_results_file_without_the_section_says_so(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": RES["meta"]}))
    for which, what in (("fp8_section", "no FP8 measurements"), ("mla_section", "no decode measurements"),
                        ("train_section", "no training-step measurements")):
        at = AppTest.from_function(_section, args=(which, str(path)), default_timeout=HANG_S).run()
        assert not at.exception and what in at.info[0].value
        assert any(results.label(RES) in c.value for c in at.caption)
        assert not at.get("plotly_chart")


def test_loss_gap_control_compares_fp8_with_bf16_against_itself():
    """With each seed's bf16 run repeated, the page reads FP8's spread against the bf16-vs-bf16 spread (both from the
    results), and a file without the control gets no such paragraph."""
    res = _seeded({0: (1.25, 1.27), 1: (1.26, 1.24), 2: (1.24, 1.26)})
    for k, again in zip("012", (1.255, 1.258, 1.242)):
        s = res["lossgap"]["seeds"][k]
        s["repeat_gap"] = again / s["bf16"]["val_loss"] - 1
    row = results.lossgap_row(res)
    assert row["repeat_gap_sd"] < row["gap_sd"] and len(row["repeat_gaps"]) == 3
    text = gpu_view._noise_text(row)
    assert f"standard deviation of {100 * row['repeat_gap_sd']:.2f}% across the 3 seeds" in text
    assert f"FP8 against bf16 spreads {100 * row['gap_sd']:.2f}% — FP8's rounding moves a run further" in text
    assert "needs more seeds" in text  # the interval of these three crosses 1%
    del res["lossgap"]["seeds"]["2"]["repeat_gap"]  # one seed without its repeat: no control to read
    assert results.lossgap_row(res)["repeat_gaps"] == {} and results.lossgap_row(res)["gap_sd"] is None
    committed = results.lossgap_row(RES)
    at = open_page("pages/fp8.py")
    shown = any("Noise without FP8" in m.value for m in at.markdown)
    assert shown == bool(committed["repeat_gaps"])


def test_a_ratio_next_to_its_target_shows_on_which_side_it_lies():
    assert gpu_view.ratio_text(1.399, 1.4) == "1.399×" and gpu_view.ratio_text(1.4004, 1.4) == "1.400×"
    assert gpu_view.ratio_text(1.43, 1.4) == "1.43×" and gpu_view.ratio_text(1.4, 1.4) == "1.40×"
    assert gpu_view.ratio_text(1.106, 1.3) == "1.11×"
    at = open_page("pages/fp8.py")
    df = gpu_view.fp8_frame(results.fp8_rows(RES))
    values = [m.value for m in at.metric] if at.metric else []
    shown = " ".join(values + [m.value for m in at.markdown])
    for _, row in df[df["target"].notna()].iterrows():
        assert gpu_view.ratio_text(row["speedup"], row["target"]) in shown


def test_scaling_table_and_text_read_the_measured_rows():
    """The FP8 page's scaling table: one row per scaling, TFLOP/s per operand pair, "refused" where cuBLAS refused;
    the text's percentages and its E5M2 sentence come from those rows."""
    from app import gpu_view
    rows = [{"scaling": s, "what": "", "a": a, "b": b, "n": 8192, "tflops": t, "error": None if t else "no"}
            for s, a, b, t in [("tensor", "e4m3", "e4m3", 1400.0), ("block", "e4m3", "e4m3", 1260.0),
                               ("tensor", "e4m3", "e5m2", 1390.0), ("block", "e4m3", "e5m2", None)]]
    df = gpu_view.scaling_frame(rows)
    assert list(df.iloc[:, 0]) == ["per tensor", "1×128 tiles × 128×128 blocks (V3 Fprop, Dgrad)"]
    assert list(df["E4M3 × E5M2"]) == ["1,390", "refused"] and list(df["E4M3 × E4M3"]) == ["1,400", "1,260"]
    text = gpu_view.scaling_text(rows)
    assert "1,260 TFLOP/s (90% of per tensor)" in text
    assert "With an E5M2 operand only per tensor ran here" in text and "128×128 blocks (V3 Fprop, Dgrad) were refused" in text


def test_the_fp8_section_says_which_recipes_run_on_the_gpu():
    """From core.cuda.fp8_linear's switch list: the GPU recipe by name, and each emulated one with its reasons."""
    from app import gpu_view
    text = gpu_view.gpu_recipes_text()
    assert "recipe `deepseek-gemm` runs real FP8 GEMMs" in text
    assert "`hybrid` (grad_fmt)" in text and "`deepseek-v3` (wgrad_tiling," in text


def test_training_section_reads_eager_and_compiled_ratios_from_the_results():
    """The training page's GPU section: the largest config's eager and compiled ratios against the 1.5× target, and
    a chart of every config's tokens/s (compiled bars only where measured)."""
    import pandas as pd
    from app.charts import gpu as charts
    from app import gpu_view
    rows = [{"config": "big", "params": 900, "batch": 8, "seq_len": 2048, "eva_tokens_per_s": 150e3,
             "transformers_tokens_per_s": 100e3, "speedup": 1.5, "eva_mfu": 0.2, "compiled_tokens_per_s": 170e3,
             "compiled_speedup": 1.7, "compiled_mfu": 0.25},
            {"config": "small", "params": 100, "batch": 16, "seq_len": 1024, "eva_tokens_per_s": 110e3,
             "transformers_tokens_per_s": 100e3, "speedup": 1.1, "eva_mfu": 0.1, "compiled_tokens_per_s": None,
             "compiled_speedup": None, "compiled_mfu": None}]
    fig = charts.train_throughput_bars(pd.DataFrame(rows), gpu_view.TARGET_TRAIN)
    assert "big config 1.70× as fast as" in fig.layout.title.text.replace("<br>", " ")
    assert [t.name for t in fig.data] == ["transformers (bf16, grouped_mm experts)", "Eva, eager",
                                          "Eva, compiled blocks (--compile)"]
    assert list(fig.data[2].text) == ["", "170k · 1.70×"]  # sorted by size: small first, then big


def test_training_section_on_the_committed_results(tmp_path):
    from core.cuda import results
    res = results.load_gpu_results()
    rows = results.train_rows(res)
    assert rows and all(r["speedup"] > 0 and 0 < r["eva_mfu"] < 1 for r in rows)
    big = max(rows, key=lambda r: r["params"])
    assert big["compiled_speedup"] == res["train"][big["config"]]["compiled_speedup_vs_transformers"]


def test_training_page_shows_the_measured_step_and_its_chart_on_request():
    """The Training page's GPU section: the heading, its label and the ratio cards at once; the plotly chart only
    when its toggle is on (a page opened from a link draws its loss curve without loading plotly)."""
    at = open_page("pages/training.py")
    assert not at.exception, [e.value for e in at.exception]
    assert "Measured on a GPU: training step vs transformers" in [s.value for s in at.subheader]
    assert any(results.label(RES) in c.value for c in at.caption)
    big = max(results.train_rows(RES), key=lambda r: r["params"])
    assert any(m.label == f"Eva vs transformers, {big['config']}, eager" for m in at.metric)
    assert not any(k.startswith("chart_gpu") for k in (getattr(c, "key", "") or "" for c in at.get("plotly_chart")))
    at.toggle(key="gpu_train_chart").set_value(True).run()
    titles = [s["layout"]["title"]["text"].replace("<br>", " ") for s in _specs(at)]
    assert any(t.startswith(f"Eva trains the {big['config']} config") for t in titles), titles
