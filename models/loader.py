"""Builds a model on "meta", then fills its parameters straight from a Hugging Face folder's safetensors.

Checkpoint tensors are read one at a time with safe_open and copied into (slices of) our parameters, so
host memory holds at most one tensor beyond the model. q/k/v and gate/up are fused here; per-expert tensors
(or transformers' stacked experts.gate_up_proj / experts.down_proj) are stacked into w13 / w2, and an EP rank
reads only its own experts.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from models.args import ModelArgs
from models.registry import config_dict, get_model_class

INDEX_FILE = "model.safetensors.index.json"


class LoadError(ValueError):
    """The checkpoint folder does not match the model: the message names the file or tensor."""


@dataclass
class _Read:
    key: str  # checkpoint tensor name
    dest: torch.Tensor  # view into one of our parameters
    rows: tuple[int, int] | None = None  # read only [start, end) along dim 0 (an EP rank's experts)


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
    def __init__(self, key_to_file: dict[str, str], model_path: str) -> None:
        self.key_to_file, self.model_path = key_to_file, model_path
        self.reads: list[_Read] = []

    def find(self, *candidates: str) -> str | None:
        for cand in candidates:
            for key in _aliases(cand):
                if key in self.key_to_file:
                    return key
        return None

    def add(self, param_name: str, dest: torch.Tensor, *candidates: str, rows: tuple[int, int] | None = None) -> None:
        key = self.find(*candidates)
        if key is None:
            raise LoadError(f"tensor {candidates[0]!r} (for parameter {param_name!r}) is missing from the checkpoint "
                            f"in {self.model_path}: is this the right model folder for its config.json?")
        self.reads.append(_Read(key, dest, rows))

    def plan(self, name: str, param: torch.Tensor, args: ModelArgs) -> None:
        prefix, _, leaf = name.rpartition(".")
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
            self.plan_experts(name, param, prefix, leaf, args)
        else:
            self.add(name, param, name)

    def plan_experts(self, name: str, param: torch.Tensor, prefix: str, leaf: str, args: ModelArgs) -> None:
        num_local = param.shape[0]
        first = args.ep_rank * num_local
        rows = (first, first + num_local)
        stacked = self.find(f"{prefix}.gate_up_proj" if leaf == "w13" else f"{prefix}.down_proj")
        if stacked is not None:  # transformers-5 layout: [E, 2I, H] (gate; up) and [E, H, I]
            self.reads.append(_Read(stacked, param, rows))
            return
        inter = param.shape[1] // 2
        for j in range(num_local):
            e = f"{prefix}.{first + j}"
            if leaf == "w13":
                self.add(name, param[j, :inter], f"{e}.gate_proj.weight", f"{e}.w1.weight")
                self.add(name, param[j, inter:], f"{e}.up_proj.weight", f"{e}.w3.weight")
            else:
                self.add(name, param[j], f"{e}.down_proj.weight", f"{e}.w2.weight")


def _qkv_rows(total: int, planner: _Planner, attn: str, leaf: str) -> tuple[int, int, int]:
    # row counts of q, k, v inside the fused qkv_proj, from the checkpoint headers' shapes
    sizes = []
    for part in ("q_proj", "k_proj", "v_proj"):
        key = planner.find(f"{attn}.{part}.{leaf}")
        if key is None:
            raise LoadError(f"tensor {attn}.{part}.{leaf!r} is missing from the checkpoint in {planner.model_path}")
        with safe_open(planner.key_to_file[key], framework="pt") as f:
            sizes.append(f.get_slice(key).get_shape()[0])
    if sum(sizes) != total:
        raise LoadError(f"{attn}.q/k/v_proj.{leaf} have {sizes} rows but the config implies {total} in all: "
                        f"config.json does not match the weights")
    return sizes[0], sizes[1], sizes[2]


def _execute(reads: list[_Read], key_to_file: dict[str, str]) -> dict[str, int]:
    stats = {"tensors": 0, "bytes": 0}
    by_file: dict[str, list[_Read]] = defaultdict(list)
    for r in reads:
        by_file[key_to_file[r.key]].append(r)
    with ExitStack() as stack, tqdm(total=len(reads), desc="loading weights", unit="tensor") as bar:
        for path, file_reads in sorted(by_file.items()):
            f = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            for r in file_reads:
                slice_ = f.get_slice(r.key)
                shape = list(slice_.get_shape())
                if r.rows is not None:
                    if shape[0] < r.rows[1]:
                        raise LoadError(f"tensor {r.key!r} in {os.path.basename(path)} has {shape[0]} experts, "
                                        f"need experts up to {r.rows[1]}: config.json does not match the weights")
                    shape[0] = r.rows[1] - r.rows[0]
                if shape != list(r.dest.shape):
                    raise LoadError(f"tensor {r.key!r} in {os.path.basename(path)} has shape {shape}, expected "
                                    f"{list(r.dest.shape)}: config.json does not match the weights")
                tensor = slice_[r.rows[0] : r.rows[1]] if r.rows is not None else f.get_tensor(r.key)
                r.dest.copy_(tensor)
                stats["tensors"] += 1
                stats["bytes"] += tensor.numel() * tensor.element_size()
                bar.update(1)
    return stats


def _init_dummy(model: nn.Module, args: ModelArgs, std: float = 0.02) -> None:
    # deterministic per parameter name and global expert id, so EP-sharded dummy models match the unsharded one
    gen = torch.Generator(device=args.device)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            seed = args.seed * 1_000_003 + zlib.crc32(name.encode())
            if name.endswith((".experts.w13", ".experts.w2")):
                first = args.ep_rank * param.shape[0]
                for j in range(param.shape[0]):
                    param[j].normal_(0.0, std, generator=gen.manual_seed(seed + first + j))
            else:
                param.normal_(0.0, std, generator=gen.manual_seed(seed))


def load_model(model_path: str, hf_config: Any, args: ModelArgs, load_format: str = "auto") -> nn.Module:
    cfg = config_dict(hf_config)
    quant = cfg.get("quantization_config") or {}
    if args.quantization == "fp8" or quant.get("quant_method") == "fp8":
        raise NotImplementedError("FP8 weights (quantization='fp8' / quantization_config.quant_method='fp8' with "
                                  "weight_scale_inv) are not supported by models/loader.py yet")
    if quant:
        raise NotImplementedError(f"quantized checkpoints ({quant.get('quant_method')!r}) are not supported")
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
            planner = _Planner(key_to_file, model_path)
            for name, param in model.named_parameters():  # a tied lm_head appears once, as embed_tokens
                planner.plan(name, param, args)
            model.load_stats = _execute(planner.reads, key_to_file)
    return model.eval()
