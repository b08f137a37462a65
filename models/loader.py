"""Builds a model on "meta", then fills its parameters straight from a Hugging Face folder's safetensors.

Checkpoint tensors are read one at a time with safe_open and copied into (slices of) our parameters, so
host memory holds at most one tensor beyond the model. q/k/v and gate/up are fused here; per-expert tensors
(or transformers' stacked experts.gate_up_proj / experts.down_proj) are stacked into w13 / w2, and an EP rank
reads only its own experts.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from kernels.fp8 import FP8_BLOCK, FP8_DTYPE, dequantize_weight_block, quantize_weight_block
from models.args import ModelArgs
from models.registry import config_dict, get_model_class

INDEX_FILE = "model.safetensors.index.json"


class LoadError(ValueError):
    """The checkpoint folder does not match the model: the message names the file or tensor."""


@dataclass
class _Read:
    key: str  # checkpoint tensor name
    dest: torch.Tensor  # view into one of our parameters (or a staging buffer)
    rows: tuple[int, int] | None = None  # read only [start, end) along dim 0 (an EP rank's experts)
    scale_key: str | None = None  # an FP8 checkpoint tensor to dequantize with this block scale


@dataclass
class _ParamPlan:
    reads: list[_Read] = field(default_factory=list)
    # online FP8: prepare allocates a staging buffer and plans the reads into it just before they run,
    # finalize quantizes it into the parameter; so one staging buffer lives at a time
    prepare: Callable[[], None] | None = None
    finalize: Callable[[], None] | None = None


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


def _aliases(key: str) -> list[str]:
    # Mixtral's HF checkpoints name the MoE block block_sparse_moe
    return [key, key.replace(".mlp.", ".block_sparse_moe.")] if ".mlp." in key else [key]


class _Planner:
    def __init__(self, model: nn.Module, key_to_file: dict[str, str], model_path: str, args: ModelArgs) -> None:
        self.model, self.key_to_file, self.model_path, self.args = model, key_to_file, model_path, args
        self.plans: list[_ParamPlan] = []
        self.current = _ParamPlan()

    def find(self, *candidates: str) -> str | None:
        for cand in candidates:
            for key in _aliases(cand):
                if key in self.key_to_file:
                    return key
        return None

    def require(self, param_name: str, *candidates: str) -> str:
        key = self.find(*candidates)
        if key is None:
            raise LoadError(f"tensor {candidates[0]!r} (for parameter {param_name!r}) is missing from the checkpoint "
                            f"in {self.model_path}: is this the right model folder for its config.json?")
        return key

    def add(self, param_name: str, dest: torch.Tensor, *candidates: str, rows: tuple[int, int] | None = None) -> str:
        key = self.require(param_name, *candidates)
        scale_key = key + "_scale_inv"  # HF FP8: weight -> weight_scale_inv, gate_up_proj -> gate_up_proj_scale_inv
        dequantize = dest.dtype != FP8_DTYPE and scale_key in self.key_to_file
        self.current.reads.append(_Read(key, dest, rows, scale_key if dequantize else None))
        return key

    def plan(self, name: str, param: torch.Tensor) -> None:
        prefix, _, leaf = name.rpartition(".")
        if leaf.endswith("_scale") and prefix.endswith(".experts"):
            return  # filled together with its weight
        self.current = _ParamPlan()
        self.plans.append(self.current)
        if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            attn = prefix[: -len(".qkv_proj")]
            q_rows, k_rows, _ = _qkv_rows(param.shape[0], self, attn, leaf)
            self.add(name, param[:q_rows], f"{attn}.q_proj.{leaf}")
            self.add(name, param[q_rows : q_rows + k_rows], f"{attn}.k_proj.{leaf}")
            self.add(name, param[q_rows + k_rows :], f"{attn}.v_proj.{leaf}")
        elif name.endswith("gate_up_proj.weight"):
            mlp, inter = prefix[: -len(".gate_up_proj")], param.shape[0] // 2
            self.add(name, param[:inter], f"{mlp}.gate_proj.weight")
            self.add(name, param[inter:], f"{mlp}.up_proj.weight")
        elif leaf in ("w13", "w2") and prefix.endswith(".experts"):
            self.plan_experts(name, param, prefix, leaf)
        else:
            self.add(name, param, name)

    def plan_experts(self, name: str, param: torch.Tensor, prefix: str, leaf: str) -> None:
        scale: torch.Tensor | None = getattr(self.model.get_submodule(prefix), f"{leaf}_scale")
        first = self.args.ep_rank * param.shape[0]  # global id of this rank's first expert
        stacked = self.find(f"{prefix}.gate_up_proj" if leaf == "w13" else f"{prefix}.down_proj")
        e = f"{prefix}.{first}"
        per_expert = ("gate_proj", "w1") if leaf == "w13" else ("down_proj", "w2")
        probe = stacked or self.require(name, *(f"{e}.{p}.weight" for p in per_expert))
        source_fp8 = probe + "_scale_inv" in self.key_to_file
        if scale is not None and not source_fp8:  # online FP8: stage in args.dtype, quantize after the reads
            plan = self.current
            self._plan_expert_reads(name, torch.empty(param.shape, device="meta"), prefix, leaf, None, stacked, first)
            plan.reads.clear()  # planned on "meta" only to report a missing tensor before anything is read

            def prepare() -> None:
                staged = torch.empty(param.shape, dtype=self.args.dtype, device=param.device)
                self.current = plan
                self._plan_expert_reads(name, staged, prefix, leaf, None, stacked, first)
                plan.finalize = lambda: _quantize_into(staged, param, scale)

            plan.prepare = prepare
            return
        self._plan_expert_reads(name, param, prefix, leaf, scale if source_fp8 else None, stacked, first)

    def _plan_expert_reads(self, name: str, dest: torch.Tensor, prefix: str, leaf: str, scale: torch.Tensor | None,
                           stacked: str | None, first: int) -> None:
        # scale: the FP8 scale parameter to fill from the checkpoint's *_scale_inv (None: no scales to read)
        num_local = dest.shape[0]
        if stacked is not None:  # transformers-5 layout: [E, 2I, H] (gate; up) and [E, H, I]
            self.add(name, dest, stacked, rows=(first, first + num_local))
            if scale is not None:
                self.add(name, scale, stacked + "_scale_inv", rows=(first, first + num_local))
            return
        inter = dest.shape[1] // 2
        for j in range(num_local):
            e = f"{prefix}.{first + j}"
            if leaf == "w13":
                gate = self.add(name, dest[j, :inter], f"{e}.gate_proj.weight", f"{e}.w1.weight")
                up = self.add(name, dest[j, inter:], f"{e}.up_proj.weight", f"{e}.w3.weight")
                if scale is not None:
                    if inter % FP8_BLOCK:
                        raise LoadError(f"FP8 experts need an intermediate size that is a multiple of {FP8_BLOCK} "
                                        f"to fuse gate/up scales, got {inter} ({name})")
                    split = inter // FP8_BLOCK
                    self.add(name, scale[j, :split], gate + "_scale_inv")
                    self.add(name, scale[j, split:], up + "_scale_inv")
            else:
                key = self.add(name, dest[j], f"{e}.down_proj.weight", f"{e}.w2.weight")
                if scale is not None:
                    self.add(name, scale[j], key + "_scale_inv")


def _quantize_into(staged: torch.Tensor, param: torch.Tensor, scale: torch.Tensor) -> None:
    q, s = quantize_weight_block(staged)
    param.copy_(q)
    scale.copy_(s)


def _qkv_rows(total: int, planner: _Planner, attn: str, leaf: str) -> tuple[int, int, int]:
    # row counts of q, k, v inside the fused qkv_proj, from the checkpoint headers' shapes
    sizes = []
    for part in ("q_proj", "k_proj", "v_proj"):
        key = planner.require(f"{attn}.qkv_proj.{leaf}", f"{attn}.{part}.{leaf}")
        with safe_open(planner.key_to_file[key], framework="pt") as f:
            sizes.append(f.get_slice(key).get_shape()[0])
    if sum(sizes) != total:
        raise LoadError(f"{attn}.q/k/v_proj.{leaf} have {sizes} rows but the config implies {total} in all: "
                        f"config.json does not match the weights")
    return sizes[0], sizes[1], sizes[2]


class _Reader:
    def __init__(self, key_to_file: dict[str, str], stack: ExitStack) -> None:
        self.key_to_file, self.stack = key_to_file, stack
        self.files: dict[str, Any] = {}
        self.stats = {"tensors": 0, "bytes": 0}

    def read(self, key: str, expected: list[int], rows: tuple[int, int] | None) -> torch.Tensor:
        path = self.key_to_file[key]
        if path not in self.files:
            self.files[path] = self.stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        slice_ = self.files[path].get_slice(key)
        shape = list(slice_.get_shape())
        if rows is not None:
            if shape[0] < rows[1]:
                raise LoadError(f"tensor {key!r} in {os.path.basename(path)} has {shape[0]} experts, need experts "
                                f"up to {rows[1]}: config.json does not match the weights")
            shape[0] = rows[1] - rows[0]
        if shape != expected:
            raise LoadError(f"tensor {key!r} in {os.path.basename(path)} has shape {shape}, expected {expected}: "
                            f"config.json does not match the weights")
        tensor = slice_[rows[0] : rows[1]] if rows is not None else self.files[path].get_tensor(key)
        self.stats["tensors"] += 1
        self.stats["bytes"] += tensor.numel() * tensor.element_size()
        return tensor


def _execute(plans: list[_ParamPlan], key_to_file: dict[str, str], show_progress: bool) -> dict[str, int]:
    # parameter by parameter, so a staging buffer for online quantization lives only while its weight loads
    total = sum(len(p.reads) for p in plans)
    bar = tqdm(total=total, desc="loading weights", unit="tensor", disable=not show_progress)
    with ExitStack() as stack, bar:
        reader = _Reader(key_to_file, stack)
        for plan in plans:
            if plan.prepare is not None:
                plan.prepare()
                bar.total += len(plan.reads)
            for r in plan.reads:
                tensor = reader.read(r.key, list(r.dest.shape), r.rows)
                if r.scale_key is not None:
                    scale = reader.read(r.scale_key, _block_shape(tensor.shape), r.rows)
                    tensor = dequantize_weight_block(tensor.to(r.dest.device), scale.to(r.dest.device), r.dest.dtype)
                r.dest.copy_(tensor)
                bar.update(1)
            if plan.finalize is not None:
                plan.finalize()
            plan.reads, plan.finalize = [], None  # frees a staging buffer
    return reader.stats


def _block_shape(shape: torch.Size) -> list[int]:
    return [*shape[:-2], -(-shape[-2] // FP8_BLOCK), -(-shape[-1] // FP8_BLOCK)]


def _init_dummy(model: nn.Module, args: ModelArgs, std: float = 0.02) -> None:
    # deterministic per parameter name and global expert id, so EP-sharded dummy models match the unsharded one
    gen = torch.Generator(device=args.device)
    for name, param in model.named_parameters():
        seed = args.seed * 1_000_003 + zlib.crc32(name.encode())
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        elif name.endswith((".experts.w13", ".experts.w2")):
            first = args.ep_rank * param.shape[0]
            scale = model.get_parameter(name + "_scale") if param.dtype == FP8_DTYPE else None
            for j in range(param.shape[0]):
                w = torch.empty(param.shape[1:], dtype=args.dtype, device=param.device)
                w.normal_(0.0, std, generator=gen.manual_seed(seed + first + j))
                if scale is None:
                    param[j].copy_(w)
                else:
                    _quantize_into(w, param[j], scale[j])
        elif not name.endswith("_scale"):
            param.normal_(0.0, std, generator=gen.manual_seed(seed))


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
    # experts stay FP8 (as stored); the other linears are dequantized to args.dtype at load
    return dataclasses.replace(args, quantization="fp8")


def load_model(model_path: str, hf_config: Any, args: ModelArgs, load_format: str = "auto") -> nn.Module:
    cfg = config_dict(hf_config)
    args = _check_quantization(cfg, args)
    if load_format not in ("auto", "dummy"):
        raise LoadError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    model_cls = get_model_class(cfg)
    with torch.device("meta"):
        model = model_cls(cfg, args)
    model.to_empty(device=args.device)
    model.tie_weights()
    model.requires_grad_(False)
    with torch.no_grad():
        if load_format == "dummy":
            _init_dummy(model, args)
        else:
            key_to_file = _index_checkpoint(model_path)
            planner = _Planner(model, key_to_file, model_path, args)
            for name, param in model.named_parameters():  # a tied lm_head appears once, as embed_tokens
                planner.plan(name, param)
            model.load_stats = _execute(planner.plans, key_to_file, show_progress=args.ep_rank == 0)
    return model.eval()
