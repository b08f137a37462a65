"""Block-scaled FP8 linear (W8A8): y = x W^T with W e4m3 in [128, 128] blocks (HF weight_scale_inv layout).

The activations are quantized per token and 128 columns (dynamic scales, as kernels.fp8.per_token_group_quant):
either in one fully parallel launch before the GEMM, or by the GEMM itself on each tile it loads (few rows: one
launch fewer). The GEMM multiplies e4m3 tiles, scales each 128-wide K step's partial product by
a_scale[m, k] * w_scale[n, k] and accumulates in fp32; the output is in the activations' dtype. N and K must be
multiples of 128 (one weight scale per tile and K step); M is any size: decode (M <= 256) reads half the weight
bytes of bf16. For a handful of rows a dot-free GEMV kernel streams the weight instead. A table entry may instead send
a shape and M bucket to cuBLAS's block-scaled FP8 GEMM (F.scaled_mm, 1x128 activation x 128x128 weight scales, the
same arithmetic): on an H200 it beats ours on GLM-4.5-Air's large projections at prefill sizes, and loses below
~256 rows (bench_fp8_linear.py, RESULTS.md); the heuristic sends a shape without an entry there from 2048 rows.
Few rows give few output tiles: the K loop is then split over several programs (fp32 partials, summed by the
last program of each tile or by one small reduce launch) so that enough weight bytes are in flight.
The tiling comes from a table tuned on the GPU (kernels/configs/fp8_linear_<gpu>.json, nearest M bucket) or a
heuristic (kernels/linear/w8a8_config.py); the kernels (tensor-core GEMM, its TMA variant, the GEMV, the
activation quantization) are in kernels/linear/w8a8_kernels.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import zeroed_counters
from kernels.fp8 import (
    _MIN_SCALE,
    FP8_BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_weight_block,
    per_token_group_quant,
    per_token_group_quant_ref,
)
from kernels.linear.w8a8_config import check_config, default_config, get_config, normalize
from kernels.linear.w8a8_kernels import (
    _split_k_reduce_kernel,
    _w8a8_dot_kernel,
    _w8a8_dot_tma_kernel,
    _w8a8_gemv_kernel,
)
from kernels.pdl import launch_kwargs, pdl_enabled

_COUNTERS: dict = {}  # per device: the fused split-K reduce's arrivals per output tile


def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
           bias: torch.Tensor | None) -> tuple[int, int]:
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"w8a8_block_linear needs a 2-D {FP8_DTYPE} weight, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    if n % FP8_BLOCK or k % FP8_BLOCK:
        raise ValueError(f"w8a8_block_linear needs N and K in whole {FP8_BLOCK}-blocks, got weight [{n}, {k}]: "
                         f"keep such a layer in 16-bit")
    if x.shape[-1] != k:
        raise ValueError(f"w8a8_block_linear: x has {x.shape[-1]} columns, the weight {k}")
    blocks = (n // FP8_BLOCK, k // FP8_BLOCK)
    if weight_scale_inv.dtype != torch.float32 or tuple(weight_scale_inv.shape) != blocks:
        raise ValueError(f"w8a8_block_linear needs fp32 weight_scale_inv of shape {list(blocks)}, got "
                         f"{weight_scale_inv.dtype} {list(weight_scale_inv.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"w8a8_block_linear: bias of shape {list(bias.shape)}, expected [{n}]")
    return n, k


def w8a8_block_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float, weight [N, K] e4m3, weight_scale_inv [N/128, K/128] fp32 -> [..., N] in x.dtype."""
    n, k = _check(x, weight, weight_scale_inv, bias)
    q, s = per_token_group_quant_ref(x.reshape(-1, k))  # [M, K] e4m3, [M, K/128]
    a = q.float() * s.repeat_interleave(FP8_BLOCK, dim=-1)
    y = a @ dequantize_weight_block(weight, weight_scale_inv, torch.float32).t()  # [M, N] fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)


@functools.cache
def _num_sms(device: torch.device) -> int:
    # the CPU interpreter: a pretend 4-SM device, so that small test shapes take the split-K path too
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _config(m: int, n: int, k: int, num_sms: int) -> dict:
    """The heuristic config (a fresh dict: callers may edit it)."""
    return default_config(m, n, k, num_sms)


@functools.lru_cache(maxsize=512)
def _resolve(m: int, n: int, k: int, device: torch.device) -> dict:
    # cached: every layer asks once per call; the table lookup reads a file the first time
    return get_config(m, n, k, device, _num_sms(device))


@functools.cache
def cublas_block_scaled_available(device: torch.device) -> bool:
    """cuBLAS's block-scaled FP8 GEMM through F.scaled_mm: torch runs the (1x128, 128x128) recipe on sm90 only (a
    Blackwell raises NotImplementedError) and with cuBLASLt 12.9+, i.e. a torch built for CUDA 12.9 or newer (a
    cu126 / cu128 build raises too; ROCm has none)."""
    cuda = torch.version.cuda
    return (device.type == "cuda" and hasattr(F, "scaled_mm") and cuda is not None
            and tuple(int(v) for v in cuda.split(".")[:2]) >= (12, 9)
            and torch.cuda.get_device_capability(device)[0] == 9)


def _cublas_takes(x2: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                  bias: torch.Tensor | None) -> bool:
    # what F.scaled_mm takes as cublas_block_scaled_linear hands it; anything else runs the entry's Triton tile.
    # Torch adds a bias only of the output's dtype, to a 16-bit output only (fp32 outputs stay on the tile: no bias
    # there, and cuBLAS's fp32 output was never measured); its scale checks refuse weight scales that are a view (a
    # K shard's columns), and a strided weight (weight.t() with a leading dimension past K) was never run. The layers
    # here own contiguous parameters (models/parallel_layers.py): their bf16 / fp16 calls are all routed
    return (x2.dtype in (torch.bfloat16, torch.float16) and (bias is None or bias.dtype == x2.dtype)
            and weight.is_contiguous() and weight_scale_inv.stride(0) == weight_scale_inv.shape[1])


def cublas_block_scaled_linear(x2: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """[M, K] -> [M, N] through F.scaled_mm's (1x128, 128x128) recipe, in the layouts it asks: the activation scales
    group-major ([M, K/128], strides (1, M): our quantizer writes them so), the weight's [N/128, K/128] scales padded
    along K to a multiple of 4 groups and read transposed. cuBLAS refuses (CUBLAS_STATUS_NOT_SUPPORTED, on an H200)
    an M that is not a multiple of 4, the scales' leading dimension: such an x is quantized into rows padded to 4,
    whose unwritten pad rows give output rows that are dropped (each output row reads its own input row only): the
    result is the first M rows of the padded output, a contiguous view."""
    m = x2.shape[0]
    q, s = per_token_group_quant(x2, group_major=True, row_multiple=4)
    groups = weight_scale_inv.shape[1]
    ws = F.pad(weight_scale_inv, (0, -groups % 4)) if groups % 4 else weight_scale_inv
    recipe = F.ScalingType
    out = F.scaled_mm(q, weight.t(), s, recipe.BlockWise1x128, ws.t(), recipe.BlockWise128x128, bias=bias,
                      output_dtype=x2.dtype)
    return out[:m]


def quantize_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float (contiguous rows) -> (q [M, K] e4m3, scale [M, K/128] fp32): per_token_group_quant, one
    program per 16 rows x 128 columns."""
    return per_token_group_quant(x2)


def w8a8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                      bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    # config: the tiling (tests, tuning; see kernels/linear/w8a8_config.py); by default the tuned table's or the
    # heuristic's for this shape and device
    n, k = _check(x, weight, weight_scale_inv, bias)
    if weight.stride(-1) != 1 or weight_scale_inv.stride(-1) != 1:
        raise ValueError("w8a8_block_linear needs a weight and weight_scale_inv with contiguous rows")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if not m:
        return torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if config is None:
        cfg = _resolve(m, n, k, x.device)
    else:
        cfg = normalize(config, k)
        check_config(cfg)
    if bias is not None and bias.stride(0) != 1:  # every kernel here, and cuBLAS's epilogue, reads it densely
        bias = bias.contiguous()
    if cfg["CUBLAS"] and cublas_block_scaled_available(x.device) and _cublas_takes(x2, weight, weight_scale_inv, bias):
        return cublas_block_scaled_linear(x2, weight, weight_scale_inv, bias).view(*x.shape[:-1], n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"]
    if n % block_n:
        raise ValueError(f"w8a8_block_linear: BLOCK_N={block_n} does not divide N={n}")
    tiles = triton.cdiv(m, block_m) * (n // block_n)
    has_bias = bias is not None
    # split K: fp32 partials [SPLIT_K, M, N], summed (+ bias) by the tile's last program or one reduce launch
    mode = 0 if split == 1 else (2 if cfg["FUSED_REDUCE"] else 1)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    counters = zeroed_counters(_COUNTERS, tiles, x.device, 4096) if mode == 2 else out
    bias_arg = bias if has_bias else out
    grid = (tiles, split)
    pdl = pdl_enabled(x.device)
    common = dict(HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_MODE=mode, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], PDL=pdl, **launch_kwargs(pdl))
    quant = dict(FP8_MAX_C=FP8_MAX, MIN_SCALE=_MIN_SCALE)  # the kernels that quantize the activations themselves
    use_tma = bool(cfg["TMA"]) and weight.data_ptr() % 16 == 0 and weight.stride(0) % 16 == 0
    if cfg["KERNEL"] == "gemv":
        _w8a8_gemv_kernel[grid](
            x2, weight, weight_scale_inv, bias_arg, out, part, counters, m, n, k, cfg["k_blocks_per_split"], split,
            x2.stride(0), weight.stride(0), weight_scale_inv.stride(0), n, **common, **quant)
    elif use_tma:
        q, s = quantize_activations(x2)
        a_desc = TensorDescriptor(q, [m, k], [q.stride(0), 1], [block_m, FP8_BLOCK])
        w_desc = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [block_n, FP8_BLOCK])
        _w8a8_dot_tma_kernel[grid](
            a_desc, s, w_desc, weight_scale_inv, bias_arg, out, part, counters, m, n, k, cfg["k_blocks_per_split"],
            split, cfg["GROUP_M"], s.stride(0), weight_scale_inv.stride(0), n, **common)
    else:
        quant_a = bool(cfg["QUANT_A"])
        # [M, K] e4m3, [M, K/128] fp32; or quantized inside the GEMM (x2 and a dummy scale pointer)
        q, s = (x2, x2) if quant_a else quantize_activations(x2)
        _w8a8_dot_kernel[grid](
            q, s, weight, weight_scale_inv, bias_arg, out, part, counters, m, n, k, cfg["k_blocks_per_split"],
            split, cfg["GROUP_M"], q.stride(0), s.stride(0), weight.stride(0), weight_scale_inv.stride(0), n,
            QUANT_A=quant_a, SWAP_AB=bool(cfg["SWAP_AB"]), **common, **quant)
    if mode == 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            part, bias_arg, out, m * n, n, SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=block, PDL=pdl,
            **launch_kwargs(pdl))
    return out.view(*x.shape[:-1], n)
