"""Builds a model on "meta", then fills its parameters straight from a Hugging Face folder's safetensors.

Generic: the model maps each parameter to its checkpoint tensors (checkpoint_sources, per architecture), and
each parameter's weight_loader (models/parallel_layers.py, models/moe.py) reads only its own slice of them:
this rank's tensor-parallel shard, its expert-parallel experts. Reads go through safetensors slicing, so host
memory holds at most one slice beyond the model. FP8 checkpoints are dequantized on read unless the parameter
itself is FP8 (experts; attention and dense linears in whole 128-blocks, models/parallel_layers.py): then the raw
e4m3 and its weight_scale_inv are copied.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import zlib
from contextlib import ExitStack
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from kernels.fp8 import FP8_BLOCK, FP8_DTYPE, dequantize_weight_block
from models.args import ModelArgs
from models.parallel_layers import LoadError, load_shard
from models.registry import config_dict, get_model_class

__all__ = ["LoadError", "load_model"]

INDEX_FILE = "model.safetensors.index.json"


def _index_checkpoint(model_path: str) -> dict[str, str]:
    # checkpoint tensor name -> file path
    if not os.path.isdir(model_path):
        raise LoadError(f"model folder {model_path!r} not found")
    index_path = os.path.join(model_path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        key_to_file = {k: os.path.join(model_path, v) for k, v in weight_map.items()}
        for path in sorted(set(key_to_file.values())):
            if not os.path.isfile(path):
                raise LoadError(f"{INDEX_FILE} lists {os.path.basename(path)!r} but it is missing from {model_path}")
        return key_to_file
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise LoadError(f"no *.safetensors files in {model_path}: download the checkpoint's weights, "
                        f"or pass load_format='dummy' for random weights")
    key_to_file = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            key_to_file.update((k, path) for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    return key_to_file


class _Files:
    """Open safetensors files, one handle each for the whole load; counts what was read."""

    def __init__(self, key_to_file: dict[str, str], stack: ExitStack) -> None:
        self.key_to_file, self.stack = key_to_file, stack
        self.handles: dict[str, Any] = {}
        self.stats = {"tensors": 0, "bytes": 0}

    def slice(self, key: str) -> Any:
        path = self.key_to_file[key]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self.handles[path].get_slice(key)

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        tensor = self.slice(key)[index] if index else self.handles[self.key_to_file[key]].get_tensor(key)
        self.stats["tensors"] += 1
        self.stats["bytes"] += tensor.numel() * tensor.element_size()
        return tensor


class CheckpointTensor:
    """A lazy checkpoint tensor handed to a weight_loader: the shape from the header, data only when read."""

    def __init__(self, key: str, files: _Files) -> None:
        self.key, self.files = key, files
        self.shape: list[int] = list(files.slice(key).get_shape())
        self.scale_key = key + "_scale_inv"  # HF block FP8: weight -> weight_scale_inv
        self.is_fp8 = self.scale_key in files.key_to_file

    def check_shape(self, expected: list[int]) -> None:
        if self.shape != list(expected):
            name = os.path.basename(self.files.key_to_file[self.key])
            raise LoadError(f"tensor {self.key!r} in {name} has shape {self.shape}, expected {list(expected)}: "
                            f"config.json does not match the weights")

    def read(self, index: tuple[slice, ...], dtype: torch.dtype) -> torch.Tensor:
        if not self.is_fp8 or dtype == FP8_DTYPE:
            return self.files.read(self.key, index)
        # dequantize: widen the last two dims to whole [128, 128] scale blocks, then cut the slice back out
        full = list(index) + [slice(None)] * (len(self.shape) - len(index))
        raw, blocks, cut = list(full), list(full), [slice(None)] * len(full)
        for d in (-2, -1):
            start, stop, _ = full[d].indices(self.shape[d])
            first = start // FP8_BLOCK * FP8_BLOCK
            raw[d], blocks[d], cut[d] = slice(first, stop), slice(first // FP8_BLOCK, -(-stop // FP8_BLOCK)), \
                slice(start - first, None)
        q = self.files.read(self.key, tuple(raw))
        return dequantize_weight_block(q, self.files.read(self.scale_key, tuple(blocks)), dtype)[tuple(cut)]

    def read_scale(self, block_index: tuple[slice, ...]) -> torch.Tensor:
        return self.files.read(self.scale_key, block_index)


def default_weight_loader(param: nn.Parameter, source: CheckpointTensor, shard_id: Any = None) -> None:
    load_shard(param, source)  # replicated on every rank: the whole tensor


def _load_checkpoint(model: nn.Module, model_path: str, show_progress: bool) -> dict[str, int]:
    key_to_file = _index_checkpoint(model_path)
    has_key = key_to_file.__contains__
    plan: list[tuple[Any, nn.Parameter, str, Any]] = []
    for name, param in model.named_parameters():  # a tied lm_head appears once, as embed_tokens
        if name.endswith(("_scale", "_scale_inv")):
            continue  # FP8 scales (experts, linears): filled by their weight's loader
        for candidates, shard_id in model.checkpoint_sources(name, has_key):
            key = next((k for k in candidates if has_key(k)), None)
            if key is None:
                raise LoadError(f"tensor {candidates[0]!r} (for parameter {name!r}) is missing from the checkpoint "
                                f"in {model_path}: is this the right model folder for its config.json?")
            owner = model.get_submodule(name.rpartition(".")[0])
            plan.append((getattr(owner, "weight_loader", default_weight_loader), param, key, shard_id))
    with ExitStack() as stack:
        files = _Files(key_to_file, stack)
        for weight_loader, param, key, shard_id in tqdm(plan, desc="loading weights", unit="tensor",
                                                        disable=not show_progress):
            weight_loader(param, CheckpointTensor(key, files), shard_id)
    return files.stats


class DummyTensor:
    """A checkpoint tensor that is not on disk (load_format="dummy"): its full shape is the one its weight loader
    expects (check_shape comes before every read), its values one seeded fp32 draw of that whole shape per
    checkpoint name (norm weights 1, biases 0). The weight loaders cut it like a real tensor, so every TP / EP
    shard of a dummy model is a slice of one and the same unsharded model, whatever the parallel layout."""

    is_fp8 = False  # FP8 parameters quantize it on load, as they do a bf16 checkpoint

    def __init__(self, key: str, seed: int, device: torch.device, std: float) -> None:
        self.key, self.seed, self.device, self.std = key, seed, device, std
        self.shape: list[int] = []

    def check_shape(self, expected: list[int]) -> None:
        self.shape = list(expected)

    def read(self, index: tuple[slice, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.key.endswith("norm.weight"):
            return torch.ones(self.shape, dtype=dtype, device=self.device)[index]
        if self.key.endswith("bias"):
            return torch.zeros(self.shape, dtype=dtype, device=self.device)[index]
        gen = torch.Generator(device=self.device).manual_seed(self.seed + zlib.crc32(self.key.encode()))
        full = torch.empty(self.shape, dtype=torch.float32, device=self.device).normal_(0.0, self.std, generator=gen)
        return full[index].to(dtype)


def _init_dummy(model: nn.Module, args: ModelArgs, std: float = 0.02) -> None:
    # every parameter through its weight loader, from the checkpoint names it would read (one tensor per expert)
    seed = args.seed * 1_000_003
    for name, param in model.named_parameters():
        if name.endswith(("_scale", "_scale_inv")):
            continue  # FP8 scales: filled by their weight's loader
        loader = getattr(model.get_submodule(name.rpartition(".")[0]), "weight_loader", default_weight_loader)
        for candidates, shard_id in model.checkpoint_sources(name, lambda key: False):
            loader(param, DummyTensor(candidates[0], seed, param.device, std), shard_id)


def _check_quantization(cfg: dict[str, Any], args: ModelArgs) -> ModelArgs:
    quant = cfg.get("quantization_config") or {}
    if not quant:
        return args
    method = quant.get("quant_method")
    if method != "fp8":
        raise NotImplementedError(f"quantized checkpoints with quant_method={method!r} are not supported (only fp8)")
    block = list(quant.get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK])
    if block != [FP8_BLOCK, FP8_BLOCK]:
        raise NotImplementedError(f"FP8 checkpoints need weight_block_size [128, 128], got {block}")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise NotImplementedError(f"FP8 activation_scheme {quant['activation_scheme']!r} is not supported (dynamic)")
    # experts and the block-aligned attention / dense linears stay FP8 (as stored); the rest is dequantized to
    # args.dtype at load (lm head, embeddings, router, linears a TP split cuts mid-block)
    return dataclasses.replace(args, quantization="fp8")


def _to_empty(model: nn.Module, device: torch.device) -> None:
    # nn.Module.to_empty, but a contiguous tensor through torch.empty: empty_like of a meta tensor runs torch's
    # Python references, whose first call imports sympy (~0.25 s of every rank's start-up); same shapes and layout
    def empty(t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            return torch.empty(t.shape, dtype=t.dtype, device=device)
        return torch.empty_like(t, device=device)

    model._apply(empty)


def load_model(model_path: str, hf_config: Any, args: ModelArgs, load_format: str = "auto") -> nn.Module:
    cfg = config_dict(hf_config)
    args = _check_quantization(cfg, args)
    if load_format not in ("auto", "dummy"):
        raise LoadError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    model_cls = get_model_class(cfg)
    with torch.device("meta"):
        model = model_cls(cfg, args)
    _to_empty(model, args.device)
    model.tie_weights()
    model.requires_grad_(False)
    with torch.no_grad():
        if load_format == "dummy":
            _init_dummy(model, args)
        else:
            first_rank = args.ep_rank == 0 and args.tp.rank == 0
            model.load_stats = _load_checkpoint(model, model_path, show_progress=first_rank)
    return model.eval()
