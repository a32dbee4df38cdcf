"""core.cuda.results: loading the committed GPU figures (CPU test; the file is written by bench/gpu_bench.py)."""
from __future__ import annotations

import json

import pytest

from core.cuda import results


def test_committed_results_file_loads_with_a_label():
    res = results.load_gpu_results()
    if res is None:
        pytest.skip("docs/gpu_results.json not committed")
    text = results.label(res)
    assert res["meta"]["device"] in text and res["meta"]["date"] in text and "torch" in text
    for rows in (results.fp8_rows(res), results.decode_rows(res), results.train_rows(res)):
        assert all(r["speedup"] > 0 for r in rows)


def test_missing_and_malformed_files(tmp_path):
    assert results.load_gpu_results(tmp_path / "none.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="gpu results: .*bad.json is not readable JSON"):
        results.load_gpu_results(bad)
    bad.write_text(json.dumps({"gemm": []}))
    with pytest.raises(ValueError, match="no meta block"):
        results.load_gpu_results(bad)


def test_rows_from_a_results_dict(tmp_path):
    res = {"meta": {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "transformers": "5.17.0",
                    "date": "2026-12-01"},
           "decode": [{"context": 32768, "batch": 8, "absorbed": {"tokens_per_s": 6000.0, "cache_bytes": 10},
                       "naive": {"tokens_per_s": 130.0, "cache_bytes": 700}, "absorbed_speedup": 46.0}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    loaded = results.load_gpu_results(path)
    assert results.label(loaded) == "NVIDIA H200 · torch 2.11.0+cu130 · CUDA 13.0 · transformers 5.17.0 · 2026-12-01"
    (row,) = results.decode_rows(loaded)
    assert row["speedup"] == 46.0 and row["naive_cache_bytes"] == 700
    assert results.fp8_rows(loaded) == [] and results.train_rows(loaded) == []


def test_mean_interval_is_the_student_t_interval():
    """The loss gap's verdict rests on this interval: mean -/+ t(0.975, n-1) * s / sqrt(n)."""
    m, lo, hi = results.mean_interval([1.0, 2.0, 3.0])  # s = 1, t(0.975, 2) = 4.303
    assert m == 2.0 and lo == pytest.approx(2 - 4.303 / 3 ** 0.5) and hi == pytest.approx(2 + 4.303 / 3 ** 0.5)
    assert results.mean_interval([0.5]) is None
    stats = pytest.importorskip("scipy.stats")
    for df, t in enumerate(results.T_975, start=1):
        assert t == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


def test_a_step_with_fp8_experts_is_labelled_apart_from_the_same_config_without():
    """`--fp8-experts` times the 920M config a second time; its row must not read like the first."""
    step = {"config": "920M", "params": 9, "batch": 8, "seq_len": 2048, "fp8_speedup": 0.8,
            "bf16": {"step_ms": 100.0}, "fp8": {"step_ms": 125.0}}
    rows = results.fp8_rows({"fp8step": {"920M": step, "920M FP8 experts": {**step, "fp8_experts": True}}})
    assert [r["what"] for r in rows] == ["training step 920M, 8×2048 tokens",
                                         "training step 920M, 8×2048 tokens, routed experts in FP8 too"]
