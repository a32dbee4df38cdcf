"""core.compile and the real-arithmetic RoPE it relies on: whole decoder blocks under torch.compile on CPU.

What a user of `--compile` depends on: the compiled blocks train the same numbers as eager (within fp32
rounding), the only graph break is the deliberate one around the routed experts, the RoPE the graphs run equals
the eager complex rotation, and a bad setting is refused with a message naming the knob.
"""
import json

import pytest
import torch

from core import gemm
from core.cli import build_configs, main, parse_args
from core.compile import compile_blocks, cpp_compiler, graph_breaks
from core.config import PRESETS
from core.model import DeepSeekV3
from core.rope import RotaryEmbedding, apply_rotary_interleaved
from core.train import TrainConfig, TrainConfigError, train

TINY = PRESETS["tiny"]
needs_cxx = pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.parametrize("nope", [0, 5])  # 5: the rope slice at an odd offset (the eager path copies it)
def test_real_rope_equals_the_complex_rotation_with_gradients(nope):
    """(cos, sin) from `RotaryEmbedding.cos_sin` through the real-arithmetic rotation == the complex multiply of the
    eager path, forward and backward, within fp32 rounding (YaRN attention factor included)."""
    cfg = TINY.replace(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                     "mscale": 1.0, "mscale_all_dim": 0.5})
    rot = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 40, 3, nope + rot.dim, generator=g, requires_grad=True)
    x = q[..., nope:]
    complex_out = apply_rotary_interleaved(x, rot(3, 40))
    real_out = apply_rotary_interleaved(x, rot.cos_sin(3, 40))
    assert (complex_out - real_out).abs().max() <= 1e-6
    w = torch.randn(complex_out.shape, generator=g)
    (gc,) = torch.autograd.grad((complex_out * w).sum(), q)
    (gr,) = torch.autograd.grad((real_out * w).sum(), q)
    assert (gc - gr).abs().max() <= 1e-6 and not gr[..., :nope].any()
    cos, sin = rot.cos_sin(3, 40)
    assert torch.equal(cos, rot(3, 40).real) and torch.equal(sin, rot(3, 40).imag)  # one table, two views


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_blocks_trace_as_whole_graphs_except_the_expert_dispatch(attention):
    """torch._dynamo.explain over each block's training forward: the dense block is ONE graph; the MoE block
    breaks only at the deliberately isolated `Experts.forward` (data-dependent shapes), nowhere else."""
    cfg = TINY.replace(attention_type=attention, num_key_value_heads=1 if attention == "gqa" else 2)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).train()
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    dense, moe = model.model.layers  # tiny: first layer dense, second MoE
    d = graph_breaks(dense, x)
    assert d == {"graphs": 1, "breaks": 0, "reasons": []}
    m = graph_breaks(moe, x)
    assert m["breaks"] >= 1 and m["reasons"]
    assert all("Experts.forward" in r and "torch.compiler.disable" in r for r in m["reasons"]), m["reasons"]


def test_compile_knob_is_validated_and_on_the_cli():
    with pytest.raises(TrainConfigError, match=r"^compile: .*FP8"):
        TrainConfig(compile=True, precision="deepseek")
    with pytest.raises(TrainConfigError, match=r"^compile: must be true or false"):
        TrainConfig(compile="yes")
    assert TrainConfig().compile is False  # the app's runs never compile
    _, cfg = build_configs(parse_args(["--preset", "tiny", "--compile", "--device", "cpu"]))
    assert cfg.compile is True
    _, cfg = build_configs(parse_args(["--preset", "tiny", "--device", "cpu"]))
    assert cfg.compile is False


def test_compile_without_a_cxx_compiler_is_refused_naming_the_flag(monkeypatch, capsys):
    monkeypatch.setattr("core.compile.cpp_compiler", lambda: None)
    monkeypatch.setattr("core.train.cpp_compiler", lambda: None)
    with pytest.raises(TrainConfigError, match=r"^compile: .*C\+\+ compiler"):
        TrainConfig(compile=True, device="cpu")
    assert main(["--preset", "tiny", "--steps", "1", "--compile", "--device", "cpu", "--quiet"]) == 2
    assert "compile" in capsys.readouterr().err


def test_eval_and_decoding_run_the_blocks_as_written():
    """Wrapping leaves state_dict names alone and the no-grad path (evaluation, decoding) runs eager, bit-identical."""
    torch.manual_seed(0)
    model = DeepSeekV3(TINY).eval()
    names = list(model.state_dict())
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ref = model(x)
    assert compile_blocks(model) == {"blocks": 3}  # 2 layers + 1 MTP block
    assert compile_blocks(model) == {"blocks": 0}  # idempotent
    assert list(model.state_dict()) == names
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@needs_cxx
@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_compiled_training_matches_eager(backend):
    """A few steps with compiled blocks (inductor's C++ backend) give eager's losses within fp32 rounding, and the
    records say the blocks ran compiled (no fallback to eager), on both fp32 GEMM libraries of core.gemm (oneDNN's
    linear enters the graphs as an opaque op)."""
    if backend == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch build / CPU has no oneDNN fp32 linear")
    torch.set_num_threads(1)  # tiny tensors (conftest restores the count after this module)
    one_moe_block = TINY.replace(num_hidden_layers=1, first_k_dense_replace=0)  # the dense block: traced above
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=0, dataset="synthetic", mtp=False)
    with gemm.using(backend):
        eager = train(one_moe_block, cfg).run()
        compiled = train(one_moe_block, cfg.replace(compile=True)).run()
    for e, c in zip(eager, compiled):
        assert c["loss"] == pytest.approx(e["loss"], abs=1e-4)
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3)
    assert eager[-1]["compiled"] is None
    st = compiled[-1]["compiled"]
    assert st["blocks"] == 1 and st["compiled_calls"] == 3 and st["eager_calls"] == 0 and not st["errors"]


def test_a_compiler_failure_falls_back_to_eager_and_says_so(monkeypatch, capsys, tmp_path):
    """If inductor fails, the run still trains (eager, the same losses), the records carry the error and the CLI
    warns naming --compile."""
    import core.compile

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no code generation for this")
        return run

    monkeypatch.setattr(core.compile, "_ERRORS", {})  # this process's other tests keep their compiled blocks
    monkeypatch.setattr(core.compile.torch, "compile", broken_compile)
    args = ["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
            "--device", "cpu", "--quiet", "--threads", "1"]
    assert main(args + ["--json", str(tmp_path / "eager.json")]) == 0
    assert main(args + ["--compile", "--json", str(tmp_path / "compiled.json")]) == 0
    assert "warning: --compile: compiling failed" in capsys.readouterr().err
    eager, compiled = (json.loads((tmp_path / f).read_text()) for f in ("eager.json", "compiled.json"))
    assert [r["loss"] for r in eager] == [r["loss"] for r in compiled]
    st = compiled[-1]["compiled"]
    assert st["compiled_calls"] == 0 and st["eager_calls"] > 0
    assert "RuntimeError: no code generation for this" in next(iter(st["errors"].values()))


def test_the_engine_imports_without_the_compiler_and_compiling_marks_the_sdpa_choice_constant():
    """Importing the engine does not load torch._dynamo (~1.5 s more for every lab worker and CLI run); compiling a
    model marks `sdpa_takes_dv` a trace-time constant, so the compiled CUDA graphs take the SDPA kernel choice made
    on their static shapes instead of tracing the probe."""
    import subprocess
    import sys
    code = "import sys, core.train, core.model; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from core import attention
    compile_blocks(DeepSeekV3(PRESETS["tiny"]))
    assert getattr(attention.sdpa_takes_dv, "_dynamo_marked_constant", False)
