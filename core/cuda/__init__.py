"""GPU paths of the engine (NVIDIA Hopper and newer): real FP8 GEMMs and device helpers.

Importing this package (or its modules) needs only torch and works on a CPU: nothing CUDA-only is touched
until a function is called with CUDA tensors. The CPU runs the same code with a dequantize-and-multiply
reference in place of the hardware GEMM, so the layout and autograd logic is tested without a GPU.

  core.cuda.device      resolve_device("auto" | "cpu" | "cuda"), describe_device()
  core.cuda.fp8_linear  DeepSeek-V3 FP8 GEMMs through torch's scaled matmul (1x128 activation tiles, 128x128
                        weight blocks), an autograd linear (Fprop / Dgrad / Wgrad in FP8) and `convert_model`
  core.cuda.kernels     the EVA_CUDA_TRITON switch and the lazy loader of the Triton modules below (`Kernels`)
  core.cuda.triton_quant fused cast-transpose FP8 quantizers (Triton; imported by fp8_linear for CUDA tensors only)
  core.cuda.triton_swiglu the routed experts' fused SwiGLU (Triton; imported by core.layers for CUDA tensors only)
"""
