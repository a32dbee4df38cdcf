"""The training engine on a device: TrainConfig.device, the CLI's --device / --config, and (on a GPU) bf16 and
real-FP8 training steps, and one forward's parity with the CPU fp32 model."""
from __future__ import annotations

import json

import pytest
import torch

from core.config import PRESETS
from core.cli import main
from core.optim import AdamW, fused_adamw_status
from core.train import TrainConfig, TrainConfigError, TrainRun, build_model

SHORT = dict(steps=12, batch_size=4, seq_len=64, eval_every=0, warmup=2, lr=3e-3, dataset="synthetic")


def test_device_is_validated_with_a_message_naming_the_knob():
    with pytest.raises(TrainConfigError, match="^device: must be one of"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainConfigError, match="^device: 'cuda' was asked for but torch sees no CUDA GPU"):
            TrainConfig(device="cuda")
    assert TrainConfig(device="auto").device == "auto"


def test_cli_trains_a_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PRESETS["tiny"].to_hf()))
    code = main(["--config", str(path), "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                 "--device", "cpu", "--quiet", "--dataset", "synthetic"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


def test_cli_reports_an_unreadable_config(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.json"), "--steps", "1", "--device", "cpu"]) == 2
    assert "error: config: cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- on the GPU
def _losses(precision: str) -> list[float]:
    run = TrainRun("mini", TrainConfig(precision=precision, device="cuda", **SHORT))
    assert run.model.lm_head.weight.is_cuda
    return [r["loss"] for r in run.run()]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "deepseek"])
def test_gpu_training_loss_is_finite_and_falls(precision):
    losses = _losses(precision)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    from core.layers import fused_swiglu_status
    status = fused_swiglu_status()  # the routed experts' SwiGLU ran as the fused Triton kernels
    assert status["error"] is None and status["ran"], status
    status = fused_adamw_status()  # and the optimizer's one-pass update over the fp32 masters
    assert status["error"] is None and status["ran"] == ["adamw_step"], status


@pytest.mark.gpu
def test_gpu_fp8_runs_the_real_fp8_linears():
    run = TrainRun("mini", TrainConfig(precision="deepseek", device="cuda", **SHORT))
    kinds = {type(m).__name__ for m in run.model.modules()}
    assert "FP8LinearGPU" in kinds and "FP8Linear" not in kinds
    assert run.model.lm_head.weight.dtype == torch.bfloat16 and isinstance(run.optimizer, AdamW)


def _forward_pair(cfg: TrainConfig, gpu_precision: str):
    mcfg = TrainRun("mini", cfg).model_config
    cpu = build_model(mcfg, cfg).eval()
    gpu = build_model(mcfg, cfg.replace(device="cuda", precision=gpu_precision)).eval()
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu(x)
        out = gpu(x.cuda()).float().cpu()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.gpu
def test_gpu_bf16_forward_matches_the_cpu_fp32_model():
    # dense FFN: with MoE, bf16 rounding flips near-tied expert choices, a discontinuity no tolerance bounds
    assert _forward_pair(TrainConfig(ffn="dense", **SHORT), "bf16") < 3e-2


@pytest.mark.gpu
def test_gpu_fp32_moe_forward_matches_the_cpu_model():
    assert _forward_pair(TrainConfig(**SHORT), "fp32") < 1e-3


def test_cuda_compiled_blocks_stay_opt_in(monkeypatch):
    """core.compile on CUDA: a run compiles its blocks with --compile or EVA_CUDA_COMPILE_BLOCKS=1, never by default
    (slower than eager on the H200 with the complex RoPE: docs/performance.md); on a CPU only --compile does."""
    from core.compile import cuda_opt_in
    from core.train import build_model, resolve_model_config
    monkeypatch.delenv("EVA_CUDA_COMPILE_BLOCKS", raising=False)
    assert not cuda_opt_in()
    monkeypatch.setenv("EVA_CUDA_COMPILE_BLOCKS", "1")
    assert cuda_opt_in()
    cfg = TrainConfig(**{**SHORT, "device": "cpu"})
    model = build_model(resolve_model_config(PRESETS["tiny"], cfg), cfg)
    assert not any("forward" in vars(m) for m in model.modules())  # the variable acts on CUDA runs only


@pytest.mark.gpu
@pytest.mark.parametrize("t", [256, 77])
def test_gpu_attention_without_v_padding_equals_the_padded_kernel(t):
    """MLA's V head dim (128) differs from q/k's (192): where cuDNN takes that as it is (`sdpa_takes_dv`), the
    unpadded call must give the output and gradients of the zero-padded one (what ran before; flash needs it)."""
    import torch.nn.functional as F
    from core.attention import causal_attention, sdpa_takes_dv
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 4, t, 192, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in "qk")
    v = torch.randn(2, 4, t, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    go = torch.randn(2, 4, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    out = causal_attention(q, k, v, 0.07)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = F.scaled_dot_product_attention(q, k, F.pad(v, (0, 64)), is_causal=True, scale=0.07)[..., :128]
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    assert isinstance(sdpa_takes_dv(q.device, q.dtype, tuple(q.shape), 128, True), bool)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
