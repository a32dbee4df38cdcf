"""FP8 numerics for the explorer: formats, fine-grained scaling, error metrics, an emulated FP8 GEMM
and the DeepSeek-V3 FP8 training recipe (V3 report §3.3).

Pure PyTorch (+ the standard library); no GPU is needed. FP8 *storage* uses torch's float8 dtypes and
FP8 *arithmetic* is emulated (quantize -> dequantize -> fp32 matmul). Everything is deterministic on CPU.

Modules (each imports only those above it; recipe before quant):
    formats   ``FORMATS``, ``get_format``, ``cast_to_fp8``, ``round_to_format``, ``bit_layout``,
              ``code_table``, ``representable_values``, ``decode_code``.
    scaling   ``quantize`` / ``dequantize`` with granularity ``tensor | row | tile | block | mx``,
              ``group_amax``, ``compute_scale``, ``overflow_count``, ``AmaxHistory`` / ``DelayedScaler``.
    metrics   ``error_metrics``, ``quantize_and_measure``, ``make_test_tensor``.
    matmul    ``fp8_gemm`` (official inference/kernel.py / DeepGEMM semantics), ``fp8_gemm_quantized``,
              ``calc_diff``, ``round_mantissa``, ``limited_accumulation_gemm``, ``accumulation_error_curve``.
    recipe    ``FP8Recipe`` / ``RECIPES`` / ``get_recipe`` (the V3 report §3.3 switches), ``operand_specs``,
              ``recipe_table``, ``recipe_notes``.
    quant     ``FP8Stats``, ``quantize_spec``, ``fake_quant``, ``quant_grad``, ``quant_act``, ``quant_weight``,
              ``quant_output_grad``, ``make_scalers``.
    training  ``fp8_gemm_train``, ``fp8_linear``, ``FP8Ops``, ``FP8Linear``, ``convert_to_fp8``, ``get_fp8_stats``.
    (probe    ``tensor_errors``: not re-exported, it imports the model.)

Convention (official inference/kernel.py ``act_quant``): the scale ``s`` is a *dequantization* scale,
``s = amax / fmt_max``; ``q = cast(clamp(x / s))`` and ``x_hat = q * s``.
Callers import from ``core.fp8``; every public name of the modules is re-exported here.
"""

from core.fp8 import formats, matmul, metrics, quant, recipe, scaling, training
from core.fp8.formats import *  # noqa: F401,F403
from core.fp8.matmul import *  # noqa: F401,F403
from core.fp8.metrics import *  # noqa: F401,F403
from core.fp8.recipe import *  # noqa: F401,F403
from core.fp8.quant import *  # noqa: F401,F403
from core.fp8.scaling import *  # noqa: F401,F403
from core.fp8.training import *  # noqa: F401,F403

__all__ = [*formats.__all__, *scaling.__all__, *metrics.__all__, *matmul.__all__, *recipe.__all__,
           *quant.__all__, *training.__all__]
