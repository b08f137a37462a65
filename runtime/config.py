"""The one engine configuration: built once, from the command line or the Python API, then passed down."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of the light processes (API server, coordinator) that read the config
    import torch

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}


class ConfigError(ValueError):
    """A user-caused configuration problem; the message says what to do."""


def default_model_path() -> str:
    """The built-in demo model shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "demo")


@dataclass(frozen=True)
class EngineConfig:
    model: str = field(default_factory=default_model_path)
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; overrides gpu_memory_utilization (the CPU needs it)
    num_gpu_blocks_override: int | None = None
    load_format: str = "auto"  # auto | dummy
    quantization: str | None = None  # None | fp8
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    enforce_eager: bool = False
    kernel_backend: str = "auto"  # auto | torch | triton
    max_cudagraph_batch_size: int | None = None
    # parallelism
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_token_capacity: int | None = None  # per-rank all2all capacity, tokens
    dp_routing: str = "prefix"  # prefix (expected prefix-cache hits against load) | load
    mixed_step_token_budget: int = 2048  # tokens per step while any sequence decodes (0: no cap)
    lockstep_lookahead: bool = False  # EP: report step s+1's plan while step s runs (runtime/lookahead.py)
    # server
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queue_len: int = 1024
    chat_template: str | None = None
    disable_log_stats: bool = False
    log_stats_interval: float = 5.0
    expert_stats_file: str | None = None
    max_restarts: int = 3
    engine_hang_timeout: float = 60.0  # seconds a rank may stay silent before it is killed and the group restarts

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"--load-format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"--kernel-backend must be auto, torch or triton, got {self.kernel_backend!r}")
        if self.quantization not in (None, "fp8"):
            raise ConfigError(f"--quantization supports only 'fp8', got {self.quantization!r}")
        dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype != "auto" and dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        if self.block_size <= 0 or self.block_size % 8:
            raise ConfigError(f"--block-size must be a positive multiple of 8, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "data_parallel_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.dp_routing not in ("prefix", "load"):
            raise ConfigError(f"--dp-routing must be prefix or load, got {self.dp_routing!r}")
        if self.mixed_step_token_budget < 0:
            raise ConfigError(f"--mixed-step-token-budget must be >= 0 tokens, got {self.mixed_step_token_budget}")
        if self.engine_hang_timeout <= 0:
            raise ConfigError(f"--engine-hang-timeout must be positive seconds, got {self.engine_hang_timeout}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not os.path.isdir(self.model):
            raise ConfigError(
                f"model folder {self.model!r} not found: pass --model PATH to a Hugging Face checkpoint folder"
            )
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ConfigError(f"{self.model!r} has no config.json: --model must be a Hugging Face model folder")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda")

    def use_triton(self, device: torch.device) -> bool:
        if self.kernel_backend == "auto":
            return device.type == "cuda"
        return self.kernel_backend == "triton"

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def hf_config(self) -> dict[str, Any]:
        with open(os.path.join(self.model, "config.json")) as f:
            return json.load(f)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineConfig.__dataclass_fields__
        a = parser.add_argument
        a("--model", default=None, help="Hugging Face model folder (default: the built-in demo model)")
        a("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
        a("--dtype", default=d["dtype"].default, help="auto, bfloat16, float16 or float32")
        a("--max-model-len", type=int, default=None, help="longest prompt + output, tokens")
        a("--max-num-seqs", type=int, default=d["max_num_seqs"].default)
        a("--max-num-batched-tokens", type=int, default=d["max_num_batched_tokens"].default)
        a("--block-size", type=int, default=d["block_size"].default)
        a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        a("--gpu-memory-utilization", type=float, default=d["gpu_memory_utilization"].default)
        a("--kv-cache-memory", type=int, default=None, help="bytes of KV cache per rank (needed on the CPU)")
        a("--num-gpu-blocks-override", type=int, default=None)
        a("--load-format", choices=["auto", "dummy"], default="auto")
        a("--quantization", choices=["fp8"], default=None)
        a("--seed", type=int, default=0)
        a("--device", choices=["auto", "cuda", "cpu"], default="auto")
        a("--enforce-eager", action="store_true", help="no CUDA graphs")
        a("--kernel-backend", choices=["auto", "torch", "triton"], default="auto")
        a("--max-cudagraph-batch-size", type=int, default=None)
        a("--data-parallel-size", "-dp", type=int, default=1)
        a("--enable-expert-parallel", action="store_true")
        a("--expert-token-capacity", type=int, default=None)
        a("--dp-routing", choices=["prefix", "load"], default=d["dp_routing"].default,
          help="how the coordinator picks a DP rank: prefix-cache hits against load, or load alone")
        a("--lockstep-lookahead", action="store_true",
          help="expert parallel: each rank reports its next step's plan while the device runs this one, so the "
               "coordinator's answer is back before the step ends (experimental)")
        a("--mixed-step-token-budget", type=int, default=d["mixed_step_token_budget"].default,
          help="most tokens a step takes while some sequence decodes (under expert parallel: on every rank while "
               "any rank decodes), so a long prefill goes in chunks and never freezes the streams (0: no cap)")
        a("--host", default=d["host"].default)
        a("--port", type=int, default=d["port"].default)
        a("--api-key", default=None)
        a("--served-model-name", default=None)
        a("--max-queue-len", type=int, default=d["max_queue_len"].default)
        a("--chat-template", default=None, help="a Jinja chat template file, replacing the tokenizer's")
        a("--disable-log-stats", action="store_true")
        a("--log-stats-interval", type=float, default=d["log_stats_interval"].default)
        a("--expert-stats-file", default=None, help="write per-rank expert statistics JSON here")
        a("--max-restarts", type=int, default=d["max_restarts"].default)
        a("--engine-hang-timeout", type=float, default=d["engine_hang_timeout"].default,
          help="seconds an engine rank may stay silent (hung step or collective) before it is killed and the "
               "rank group restarts")
        return parser

    @staticmethod
    def from_cli(args: argparse.Namespace) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        kwargs = {k: v for k, v in vars(args).items() if k in names and v is not None}
        return EngineConfig(**kwargs)
