"""Tensor-parallel layers and their weight loaders.

Each layer receives its TP rank and size (models.args.TensorParallel) and never asks torch.distributed for them.
A layer's weight_loader(param, source, shard_id) loads each of its parameters: the generic loader
(models/loader.py) finds the checkpoint tensor a model maps to the parameter and hands over a lazy `source`;
the weight loader reads only this rank's shard of it (safetensors slicing: no rank ever holds the full
tensor) and copies it into place.

A source (models.loader.CheckpointTensor) offers: key, shape (the full tensor's), check_shape(expected) and
read(index, dtype) -> the slice, dequantized when the checkpoint is FP8 and dtype is not; an FP8 one also offers
is_fp8 and read_scale(block_index) -> its weight_scale_inv blocks.

FP8 (ModelArgs.quantization == "fp8"): the column- and row-parallel linears (attention q/k/v and o, dense and
shared-expert MLPs) keep e4m3 `weight` with fp32 `weight_scale_inv` [N/128, K/128] (the HF layout) and run the
block-scaled W8A8 GEMM (kernels/linear/w8a8.py). A layer whose local shard is not in whole [128, 128] blocks (a
TP split that cuts a block, a small model) stays in args.dtype, with a log line.

16-bit weights with args.use_triton: at most 16 rows (decode) run the GEMV of kernels/linear/gemv.py where the GPU's
measured table (kernels/configs/linear_gemv_<gpu>.json) has the shape and row count, i.e. where it beat cuBLAS. FP8
weights likewise run its weight-only FP8 variant (W8A16) where kernels/configs/linear_gemv_fp8_<gpu>.json has them,
i.e. where it beat the W8A8 GEMM.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fp8 import FP8_BLOCK, FP8_DTYPE, quantize_weight_block
from kernels.linear import gemv, w8a8
from models.args import ModelArgs, TensorParallel

logger = logging.getLogger(__name__)


class LoadError(ValueError):
    """The checkpoint folder does not match the model: the message names the file or tensor."""


class Source(Protocol):
    key: str
    shape: list[int]

    def check_shape(self, expected: list[int]) -> None: ...
    def read(self, index: tuple[slice, ...], dtype: torch.dtype) -> torch.Tensor: ...


def divide(size: int, tp: TensorParallel, what: str) -> int:
    if size % tp.size:
        raise ValueError(f"{what} {size} is not divisible by the tensor-parallel size {tp.size}")
    return size // tp.size


def load_shard(dest: torch.Tensor, source: Source, dim: int | None = None, start: int = 0,
               full: int | None = None) -> None:
    """dest <- source[start : start + len] along dim (whole tensor when dim is None). full: the source's size
    along dim; rows past its end (vocab padding) are zeroed."""
    expected = list(dest.shape)
    if dim is None:
        source.check_shape(expected)
        dest.copy_(source.read((), dest.dtype))
        return
    expected[dim] = full if full is not None else dest.shape[dim]
    source.check_shape(expected)
    length = max(0, min(dest.shape[dim], expected[dim] - start))
    index = tuple(slice(None) for _ in range(dim)) + (slice(start, start + length),)
    if length:
        dest.narrow(dim, 0, length).copy_(source.read(index, dest.dtype))
    if length < dest.shape[dim]:
        dest.narrow(dim, length, dest.shape[dim] - length).zero_()


def _param(shape: tuple[int, ...], args: ModelArgs, dtype: torch.dtype | None = None) -> nn.Parameter:
    # the weight loader is the owning module's method, not an attribute: to_empty() makes new Parameters
    return nn.Parameter(torch.empty(shape, dtype=dtype or args.dtype), requires_grad=False)


_LOGGED: set[str] = set()  # fallback messages already logged (one line per shape, not one per layer)


def _use_fp8(args: ModelArgs, what: str, rows: list[int], cols: int) -> bool:
    """FP8 for a linear whose local weight is [sum(rows), cols], each merged part (rows) and cols in whole blocks:
    then every TP shard starts on a block boundary of the checkpoint's scale grid too."""
    if args.quantization != "fp8":
        return False
    if all(r % FP8_BLOCK == 0 for r in rows) and cols % FP8_BLOCK == 0:
        return True
    msg = (f"FP8: {what} weight of local rows {rows} x cols {cols} (tp={args.tp.size}) is not in whole "
           f"{FP8_BLOCK}x{FP8_BLOCK} blocks: kept in {args.dtype} (an FP8 checkpoint's weight dequantized at load)")
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logger.info(msg)
    return False


def _init_weight(module: nn.Module, rows: int, cols: int, args: ModelArgs, fp8: bool) -> None:
    module.weight = _param((rows, cols), args, FP8_DTYPE if fp8 else None)
    module.weight_scale_inv = _param((rows // FP8_BLOCK, cols // FP8_BLOCK), args, torch.float32) if fp8 else None
    module._fp8_linear = w8a8.w8a8_block_linear if args.use_triton else w8a8.w8a8_block_linear_ref
    # 16-bit or FP8 weights under 16-bit activations, with Triton kernels: the GEMV (kernels/linear/gemv.py) for a few
    # rows where the GPU's measured table has the shape (it beat cuBLAS / the W8A8 linear there), else those
    module._gemv = args.use_triton and args.dtype in (torch.float16, torch.bfloat16)


def _linear(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    cfg = gemv.dispatch_config(x, module.weight) if module._gemv else None
    if module.weight_scale_inv is None:
        if cfg is not None:
            return gemv.gemv_linear(x, module.weight, bias, cfg)
        return F.linear(x, module.weight, bias)
    if cfg is not None:  # W8A16: x stays 16-bit
        return gemv.gemv_linear_fp8(x, module.weight, module.weight_scale_inv, bias, cfg)
    return module._fp8_linear(x, module.weight, module.weight_scale_inv, bias)


def load_fp8_shard(weight: torch.Tensor, scale: torch.Tensor, source: Source, dim: int, start: int,
                   full: int) -> None:
    """weight [R, C] e4m3 <- source rows (dim 0) or columns (dim 1) [start, start + R or C), scale [R/128, C/128]
    <- its block scales: copied raw from an FP8 checkpoint (start and size are whole blocks, _use_fp8), or
    quantized here from a float one (online FP8)."""
    expected = list(weight.shape)
    expected[dim] = full
    source.check_shape(expected)
    index = (slice(None),) * dim + (slice(start, start + weight.shape[dim]),)
    if getattr(source, "is_fp8", False):
        weight.copy_(source.read(index, FP8_DTYPE))
        block_index = (slice(None),) * dim + (slice(start // FP8_BLOCK, (start + weight.shape[dim]) // FP8_BLOCK),)
        blocks = source.read_scale(block_index)  # type: ignore[attr-defined]
        if blocks.shape != scale.shape:  # any float dtype is taken (copied into fp32)
            raise LoadError(f"{source.key}_scale_inv: expected [128, 128] block scales of shape {list(scale.shape)} "
                            f"for this shard, got {list(blocks.shape)}: weight_block_size does not match the tensors")
        scale.copy_(blocks)
    else:
        q, s = quantize_weight_block(source.read(index, torch.float32).to(weight.device))
        weight.copy_(q)
        scale.copy_(s)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over the TP ranks; the output stays split (a row-parallel layer
    or a gather follows)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, args: ModelArgs,
                 local_sizes: list[int] | None = None, what: str = "output size") -> None:
        super().__init__()
        self.tp = args.tp
        # a merged layer (gate_up, qkv) holds several checkpoint tensors side by side, each split over the ranks
        self.out_sizes = list(out_sizes)
        self.local_sizes = local_sizes or [divide(s, args.tp, what) for s in out_sizes]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(out_sizes))]
        rows = sum(self.local_sizes)
        _init_weight(self, rows, in_features, args, _use_fp8(args, type(self).__name__, self.local_sizes, in_features))
        self.bias = _param((rows,), args) if bias else None

    def _load_rows(self, param: nn.Parameter, source: Source, i: int, start: int) -> None:
        # merged part i: this rank's rows [start, start + local) of the checkpoint tensor
        dest = param.narrow(0, self.offsets[i], self.local_sizes[i])
        if param.dtype != FP8_DTYPE:
            load_shard(dest, source, 0, start, self.out_sizes[i])
            return
        blocks = slice(self.offsets[i] // FP8_BLOCK, (self.offsets[i] + self.local_sizes[i]) // FP8_BLOCK)
        load_fp8_shard(dest, self.weight_scale_inv[blocks], source, 0, start, self.out_sizes[i])

    def weight_loader(self, param: nn.Parameter, source: Source, shard_id: int | None = None) -> None:
        i = shard_id or 0
        self._load_rows(param, source, i, self.tp.rank * self.local_sizes[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate_up_proj: [gate; up] of this rank, loaded from gate_proj (shard 0) and up_proj (shard 1)."""


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v with whole heads per rank. KV heads split when num_kv_heads >= tp, else each KV head is
    replicated on tp / num_kv_heads ranks (the ones whose query heads use it)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 args: ModelArgs) -> None:
        tp = args.tp
        self.num_local_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_local_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
            self.first_kv_head = tp.rank * self.num_local_kv_heads
        else:
            if tp.size % num_kv_heads:
                raise ValueError(f"num_key_value_heads {num_kv_heads} is below the tensor-parallel size {tp.size} "
                                 f"and does not divide it: choose a tensor-parallel size that it divides")
            self.num_local_kv_heads = 1
            self.first_kv_head = tp.rank // (tp.size // num_kv_heads)
        self.head_dim = head_dim
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        local_kv = self.num_local_kv_heads * head_dim
        super().__init__(hidden_size, [q, kv, kv], bias, args, [self.num_local_heads * head_dim, local_kv, local_kv])

    def weight_loader(self, param: nn.Parameter, source: Source, shard_id: Any = None) -> None:
        i = {"q": 0, "k": 1, "v": 2}[shard_id]
        start = self.tp.rank * self.local_sizes[0] if i == 0 else self.first_kv_head * self.head_dim
        self._load_rows(param, source, i, start)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over the TP ranks: each rank's partial sum, all-reduced unless
    the caller folds several partial sums into one all-reduce (reduce_results=False)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, args: ModelArgs,
                 reduce_results: bool = True, what: str = "input size") -> None:
        super().__init__()
        self.tp, self.reduce_results = args.tp, reduce_results
        self.in_features = in_features
        self.local_in = divide(in_features, args.tp, what)
        fp8 = _use_fp8(args, type(self).__name__, [out_features], self.local_in)
        _init_weight(self, out_features, self.local_in, args, fp8)
        self.bias = _param((out_features,), args) if bias else None

    def weight_loader(self, param: nn.Parameter, source: Source, shard_id: Any = None) -> None:
        start = self.tp.rank * self.local_in
        if param.dim() == 1:  # the bias is whole on every rank, added once after the reduction
            load_shard(param, source)
        elif param.dtype == FP8_DTYPE:
            load_fp8_shard(param, self.weight_scale_inv, source, 1, start, self.in_features)
        else:
            load_shard(param, source, 1, start, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _linear(self, x, None)
        if self.reduce_results:
            self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows of the vocabulary split in ceil(vocab / tp) blocks (the last padded with zero rows); each rank looks
    up the ids it holds, zeros for the others, and an all-reduce puts the rows together (exact: one nonzero
    term per element)."""

    def __init__(self, vocab_size: int, hidden_size: int, args: ModelArgs) -> None:
        super().__init__()
        self.tp, self.vocab_size = args.tp, vocab_size
        self.rows_per_rank = -(-vocab_size // args.tp.size)
        self.first_row = args.tp.rank * self.rows_per_rank
        self.weight = _param((self.rows_per_rank, hidden_size), args)

    def weight_loader(self, param: nn.Parameter, source: Source, shard_id: Any = None) -> None:
        load_shard(param, source, 0, self.first_row, self.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first_row
        mine = (local >= 0) & (local < self.rows_per_rank)  # [T]
        x = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits of this rank's vocabulary rows, gathered on TP rank 0 (the one that samples) into the full
    [N, vocab] fp32; the peers get None. Gathered in the weights' dtype, which is what the linear wrote: the
    upcast after the gather gives the same numbers for half the bytes."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp.gather_to_first(F.linear(hidden, self.weight), dim=-1)  # [N, rows_per_rank] per rank
        return logits[:, : self.vocab_size].float() if logits is not None else None
