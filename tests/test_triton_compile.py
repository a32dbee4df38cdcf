"""Every Triton kernel of core/cuda compiles for Hopper (sm_90) on a machine without a GPU: Triton's front end and
ptxas run on the CPU. The interpreter tests (TRITON_INTERPRET=1) run the kernels as Python and so miss what only
the compiler rejects (e.g. a loop-carried name whose block shape changes). Skipped where triton is not installed."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from core.cuda import triton_adamw as ta, triton_quant as tq, triton_swiglu as ts  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_QUANT_SIG = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "qt_ptr": "*fp8e4nv", "st_ptr": "*fp32",
              "M": "i32", "K": "i32", "Mp": "i32", "Kp": "i32", "stride_m": "i32", "stride_k": "i32",
              **dict.fromkeys(["TRANSPOSED", "RECIP", "FLOOR", "FMAX", "B", "SUB", "STAGES"], "constexpr")}
_BLOCK_SIG = {"w_ptr": "*fp32", **{k: v for k, v in list(_QUANT_SIG.items())[1:5]}, "N": "i32", "K": "i32",
              "Np": "i32", "Kp": "i32", "stride_n": "i32", "stride_k": "i32",
              **{k: v for k, v in _QUANT_SIG.items() if v == "constexpr"}}


def _compile(fn, signature: dict, constexprs: dict, num_warps: int) -> None:
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER,
                   options={"num_warps": num_warps})


def _quant_consts(transposed, sub, stages):
    return {"TRANSPOSED": transposed, "RECIP": True, "FLOOR": tq.AMAX_FLOOR, "FMAX": 448.0, "B": tq.BLOCK,
            "SUB": sub, "STAGES": stages}


@pytest.mark.parametrize("sub,warps,stages", [(tq.TILE_SUB, tq.TILE_WARPS, tq.TILE_STAGES), (16, 4, 1), (64, 8, 2),
                                              (128, 16, 1)])
@pytest.mark.parametrize("transposed", [True, False])
def test_tile_quantizer_compiles_for_hopper(sub, warps, stages, transposed):
    _compile(tq._tile_dual_kernel, _QUANT_SIG, _quant_consts(transposed, sub, stages), warps)


@pytest.mark.parametrize("sub,warps,stages", [(tq.BLOCK_SUB, tq.BLOCK_WARPS, tq.BLOCK_STAGES), (16, 4, 1), (64, 8, 2),
                                              (128, 16, 1)])
def test_block_quantizer_compiles_for_hopper(sub, warps, stages):
    _compile(tq._block_dual_kernel, _BLOCK_SIG, _quant_consts(True, sub, stages), warps)


@pytest.mark.parametrize("width,weighted", [(512, True), (200, False)])
def test_fused_swiglu_compiles_for_hopper(width, weighted):
    fwd = {"gu_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "S": "i32", "I": "constexpr", "stride_gu": "i32",
           "stride_h": "i32", "HAS_W": "constexpr", "BS": "constexpr", "BI": "constexpr"}
    _compile(ts._fwd_kernel, fwd, {"I": width, "HAS_W": weighted, "BS": ts.BLOCK_S, "BI": ts.BLOCK_I}, 4)
    bwd = {"gu_ptr": "*bf16", "w_ptr": "*bf16", "dh_ptr": "*bf16", "d_ptr": "*bf16", "dw_ptr": "*bf16", "S": "i32",
           "I": "constexpr", "stride_gu": "i32", "stride_dh": "i32", "stride_d": "i32", "HAS_W": "constexpr",
           "NEED_DW": "constexpr", "BS": "constexpr", "BI": "constexpr"}
    _compile(ts._bwd_kernel, bwd, {"I": width, "HAS_W": weighted, "NEED_DW": weighted, "BS": ts.BLOCK_S,
                                   "BI": ts.BLOCK_I}, 4)


@pytest.mark.parametrize("pdtype,mdtype,master", [("*bf16", "*fp32", True), ("*bf16", "*bf16", True),
                                                  ("*fp32", "*bf16", False)])
def test_fused_adamw_compiles_for_hopper(pdtype, mdtype, master):
    sig = {"p_ptr": pdtype, "g_ptr": pdtype, "w_ptr": "*fp32" if master else pdtype, "m_ptr": mdtype, "v_ptr": mdtype,
           "scale_ptr": "*fp32", "n": "i64", **dict.fromkeys(["decay", "step_size", "b1", "b2", "eps", "bc2_sqrt"],
                                                              "fp32"),
           **dict.fromkeys(["HAS_MASTER", "HAS_SCALE", "BLOCK"], "constexpr")}
    _compile(ta._adamw_kernel, sig, {"HAS_MASTER": master, "HAS_SCALE": True, "BLOCK": ta.BLOCK}, ta.WARPS)
