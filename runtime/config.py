"""The one engine configuration: built once, from the command line or the Python API, then passed down."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.info import ConfigError, ModelInfo, check_rope, model_max_len, rope_parameters, text_config

if TYPE_CHECKING:  # torch stays out of the light processes (API server, coordinator) that read the config
    import torch

DTYPES = ("float32", "float16", "bfloat16")
# all2all backends by name (runtime/distributed/all2all.py registers these; kept here so the light processes validate
# --all2all-backend without importing torch)
ALL2ALL_BACKENDS = ("allgather", "sparse")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


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
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8 | fp8_e4m3
    max_mixed_cudagraph_tokens: int = 2048  # steps with a prefill up to this many tokens replay CUDA graphs; 0: off
    # plan and queue step s+1 before step s's tokens are read (engine/async_step.py); None (the default): on, unless
    # sync_scheduling_reason() names a setting it cannot run with; True there is an error, False: synchronous steps
    async_scheduling: bool | None = None
    # parallelism
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_token_capacity: int | None = None  # per-rank all2all capacity, tokens
    all2all_backend: str | None = None  # None: sparse when EP > 1 (see runtime/distributed/all2all.py)
    all2all_fp8_dispatch: bool = False  # sparse backend: FP8 hidden rows (scales per token and 128 channels)
    tensor_parallel_size: int = 1  # ranks per DP rank; the world is DP x TP
    dp_routing: str = "prefix"  # prefix (expected prefix-cache hits against load) | load
    mixed_step_token_budget: int = 2048  # tokens per step while any sequence decodes (0: no cap)
    lockstep_lookahead: bool = False  # EP: report step s+1's plan while step s runs (runtime/cluster/lookahead.py)
    # sparse all2all, fixed-size (CUDA-graph) steps: slots per destination = the uniform-routing mean + 4 sd, times
    # this (runtime/distributed/all2all_sparse.py capacity_slots); an overflowing step is re-run exactly; 0 = T slots
    all2all_capacity_factor: float = 1.25
    all2all_static_max_tokens: int | None = None  # steps up to this size use fixed-size exchanges (default: graphs')
    # server
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | list[str] | None = None  # several names as vLLM; the first one is the primary
    max_queue_len: int = 1024
    chat_template: str | None = None
    disable_log_stats: bool = False
    log_stats_interval: float = 5.0
    expert_stats_file: str | None = None
    max_restarts: int = 3
    engine_hang_timeout: float = 60.0  # seconds a rank may stay silent before it is killed and the group restarts
    enable_auto_tool_choice: bool = False  # tool_choice "auto": parse tool calls out of the model's text
    tool_call_parser: str | None = None  # hermes | glm45
    reasoning_parser: str | None = None  # qwen3 | glm45 | deepseek_r1
    generation_config: str = "auto"  # auto (the model's generation_config.json) | vllm (none) | a folder

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"--load-format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"--kernel-backend must be auto, torch or triton, got {self.kernel_backend!r}")
        if self.quantization not in (None, "fp8"):
            raise ConfigError(f"--quantization supports only 'fp8', got {self.quantization!r}")
        if self.all2all_backend is not None and self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ConfigError(f"unknown --all2all-backend {self.all2all_backend!r}; available: "
                              f"{', '.join(ALL2ALL_BACKENDS)}")
        if self.expert_token_capacity is not None and self.expert_token_capacity <= 0:
            raise ConfigError(f"--expert-token-capacity must be positive, got {self.expert_token_capacity}")
        if self.all2all_fp8_dispatch and self.all2all_backend == "allgather":
            raise ConfigError("--all2all-fp8-dispatch needs --all2all-backend sparse (allgather sends full rows)")
        if not self.all2all_capacity_factor >= 0:  # also refuses NaN
            raise ConfigError(f"--all2all-capacity-factor must be >= 0 (0: no capacity limit), got "
                              f"{self.all2all_capacity_factor}")
        if self.all2all_static_max_tokens is not None and self.all2all_static_max_tokens < 0:
            raise ConfigError(f"--all2all-static-max-tokens must be >= 0, got {self.all2all_static_max_tokens}")
        dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype != "auto" and dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        if self.block_size <= 0 or self.block_size % 8:
            raise ConfigError(f"--block-size must be a positive multiple of 8, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "data_parallel_size", "tensor_parallel_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (hermes or glm45)")
        if self.dp_routing not in ("prefix", "load"):
            raise ConfigError(f"--dp-routing must be prefix or load, got {self.dp_routing!r}")
        if self.max_mixed_cudagraph_tokens < 0:
            raise ConfigError(f"--max-mixed-cudagraph-tokens must be >= 0 (0: off), got "
                              f"{self.max_mixed_cudagraph_tokens}")
        if self.mixed_step_token_budget < 0:
            raise ConfigError(f"--mixed-step-token-budget must be >= 0 tokens, got {self.mixed_step_token_budget}")
        if self.async_scheduling and (reason := self.sync_scheduling_reason()) is not None:
            raise ConfigError(f"--async-scheduling cannot run with {reason}: drop one of the two")
        if self.engine_hang_timeout <= 0:
            raise ConfigError(f"--engine-hang-timeout must be positive seconds, got {self.engine_hang_timeout}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not os.path.isdir(self.model):
            from runtime.model_source import resolve_model

            try:
                resolved = resolve_model(self.model)  # a Hugging Face id: the cached (or downloaded) snapshot
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if resolved is not None:
                if self.served_model_name is None:  # served under the id as given, as vLLM does
                    object.__setattr__(self, "served_model_name", self.model)
                object.__setattr__(self, "model", resolved)
        if not os.path.isdir(self.model):
            raise ConfigError(
                f"model folder {self.model!r} not found: pass --model PATH to a Hugging Face checkpoint folder"
            )
        gen = self.generation_config
        if gen not in ("auto", "vllm") and not os.path.isfile(os.path.join(gen, "generation_config.json")):
            raise ConfigError(f"--generation-config {gen!r}: give auto, vllm or a folder with generation_config.json")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ConfigError(f"{self.model!r} has no config.json: --model must be a Hugging Face model folder")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        # checked here, before any rank starts: a rank that fails on it would only be restarted
        check_rope(rope_parameters(text_config(self.hf_config())))
        limit = model_max_len(self.hf_config())
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ConfigError(f"--max-model-len {self.max_model_len} is longer than the model's context of {limit} "
                              f"tokens (max_position_embeddings and rope scaling); pass a value <= {limit}")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def served_model_names(self) -> list[str]:
        """What clients may send as "model": --served-model-name if given, else the --model string as given
        (vLLM's name) and its folder name as an alias."""
        if self.served_model_name:
            names = [self.served_model_name] if isinstance(self.served_model_name, str) else self.served_model_name
            return list(dict.fromkeys(names))
        return list(dict.fromkeys([self.model, os.path.basename(os.path.normpath(self.model))]))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

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

    def cuda_graph_max_batch(self, device: torch.device) -> int:
        """Largest decode batch captured as a CUDA graph; 0 = eager only."""
        if device.type != "cuda" or not self.use_triton(device) or self.enforce_eager:
            return 0
        return min(self.max_num_seqs, self.max_cudagraph_batch_size or 512)

    def mixed_cudagraph_tokens(self, device: torch.device) -> int:
        """Largest step with a prefill (padded to a token bucket) captured as a CUDA graph; 0 = eager only."""
        if not self.cuda_graph_max_batch(device):
            return 0
        return min(self.max_mixed_cudagraph_tokens, self.max_num_batched_tokens)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @property
    def needs_lockstep(self) -> bool:
        """The DP ranks step together (the coordinator issues every step; an idle rank runs dummy steps) only
        when their forwards share collectives: expert parallel over two or more DP ranks. Pure DP, dense
        models and EP inside one DP rank (its TP peers follow its plans) run freely."""
        return self.enable_expert_parallel and self.data_parallel_size > 1

    def sync_scheduling_reason(self) -> str | None:
        """The setting under which steps run synchronously whatever the default says; None: async scheduling
        can run."""
        if self.lockstep_lookahead and self.needs_lockstep:
            # the rank reports its next plan while a step runs, estimated from the host's view of the step before
            return "--lockstep-lookahead (expert-parallel lockstep)"
        return None

    @property
    def use_async_scheduling(self) -> bool:
        return self.async_scheduling is not False and self.sync_scheduling_reason() is None

    def resolved_max_model_len(self) -> int:
        return self.max_model_len or model_max_len(self.hf_config())

    def model_info(self) -> ModelInfo:
        return ModelInfo.read(self.model)

    def hf_config(self) -> dict[str, Any]:
        with open(os.path.join(self.model, "config.json")) as f:
            return json.load(f)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineConfig.__dataclass_fields__
        a = parser.add_argument
        a("--model", default=None, help="Hugging Face model folder or id org/name, resolved through the HF cache "
          "(default: the built-in demo model)")
        a("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
        a("--dtype", default=d["dtype"].default, help="auto, bfloat16, float16 or float32")
        a("--max-model-len", type=int, default=None,
          help="longest prompt + output, tokens (default: the model's max_position_embeddings)")
        a("--max-num-seqs", type=int, default=d["max_num_seqs"].default, help="most sequences in one batch, per rank")
        a("--max-num-batched-tokens", type=int, default=d["max_num_batched_tokens"].default,
          help="most tokens in one step, per rank (longer prompts are prefilled in chunks)")
        a("--block-size", type=int, default=d["block_size"].default, help="tokens per KV-cache block (a multiple of 8)")
        a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
          help="reuse the KV blocks of a shared prompt prefix")
        a("--gpu-memory-utilization", type=float, default=d["gpu_memory_utilization"].default,
          help="fraction of GPU memory for weights, activations and KV cache")
        a("--kv-cache-memory", type=int, default=None,
          help="bytes of KV cache per rank (needed on the CPU; default: from --gpu-memory-utilization)")
        a("--num-gpu-blocks-override", type=int, default=None, help="KV blocks per rank (default: measured)")
        a("--load-format", choices=["auto", "dummy"], default="auto",
          help="dummy: random weights of the right shapes (benchmarks without a checkpoint)")
        a("--quantization", choices=["fp8"], default=None,
          help="fp8: expert, attention and dense MLP weights in FP8 with 128x128 block scales "
               "(default: none, the checkpoint's dtype)")
        a("--seed", type=int, default=0, help="random seed (dummy weights, unseeded sampling)")
        a("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when a GPU is visible")
        a("--enforce-eager", action="store_true", help="no CUDA graphs")
        a("--kernel-backend", choices=["auto", "torch", "triton"], default="auto",
          help="auto: Triton kernels on the GPU, the torch reference on the CPU")
        a("--max-cudagraph-batch-size", type=int, default=None,
          help="largest decode batch captured as a CUDA graph (default: --max-num-seqs)")
        a("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
          help="fp8 / fp8_e4m3: KV cache in FP8 e4m3 with per-tensor scales (twice the tokens per GiB)")
        a("--max-mixed-cudagraph-tokens", type=int, default=d["max_mixed_cudagraph_tokens"].default,
          help="steps that carry a prefill (decodes + a prompt's chunk) up to this many tokens are padded to a "
               "token bucket (64, 128, ... powers of two) and replayed as CUDA graphs (capped by "
               "--max-num-batched-tokens; 0: such steps run eagerly)")
        a("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
          help="queue each step on the device before the previous step's tokens are read, so the GPU never waits "
               "on the host between steps (default: on; a step with prompt logprobs runs synchronously, and "
               "--lockstep-lookahead turns it off; --no-async-scheduling: every step synchronous)")
        a("--data-parallel-size", "-dp", type=int, default=1, help="engine ranks, one GPU each")
        a("--enable-expert-parallel", action="store_true",
          help="split the experts of every MoE layer across the ranks (all2all, lockstep steps)")
        a("--expert-token-capacity", type=int, default=None,
          help="all2all buffer per rank, tokens (default: from --max-num-batched-tokens)")
        a("--all2all-backend", default=None,
          help=f"expert all2all: {' or '.join(ALL2ALL_BACKENDS)} (default: sparse when expert parallel)")
        a("--all2all-fp8-dispatch", action="store_true",
          help="sparse all2all: send hidden rows as FP8, scales per token and 128 channels (~half the bytes)")
        a("--tensor-parallel-size", "-tp", type=int, default=1,
          help="ranks (GPUs) per data-parallel rank, the model's heads, MLPs and vocabulary split over them")
        a("--dp-routing", choices=["prefix", "load"], default=d["dp_routing"].default,
          help="how the coordinator picks a DP rank: prefix-cache hits against load, or load alone")
        a("--lockstep-lookahead", action="store_true",
          help="expert parallel: each rank reports its next step's plan while the device runs this one, so the "
               "coordinator's answer is back before the step ends (experimental)")
        a("--mixed-step-token-budget", type=int, default=d["mixed_step_token_budget"].default,
          help="most tokens a step takes while some sequence decodes (under expert parallel: on every rank while "
               "any rank decodes), so a long prefill goes in chunks and never freezes the streams (0: no cap)")
        a("--all2all-capacity-factor", type=float, default=d["all2all_capacity_factor"].default,
          help="sparse all2all in CUDA-graph steps: slots per destination = (uniform-routing mean + 4 sd) x this, "
               "at most the step's tokens; a step that overflows is re-run exactly (0: as many slots as tokens)")
        a("--all2all-static-max-tokens", type=int, default=None,
          help="steps up to this many tokens use the sparse all2all's fixed-size exchange (default: the largest "
               "CUDA-graph batch; on the CPU 0, set it to run the graph path there)")
        a("--host", default=d["host"].default, help="address the API server listens on")
        a("--port", type=int, default=d["port"].default, help="port the API server listens on")
        a("--api-key", default=None,
          help="clients must send 'Authorization: Bearer KEY' (default: $VLLM_API_KEY, which keeps it out of ps)")
        a("--served-model-name", nargs="+", default=None,
          help="the model name(s) clients send (default: the --model string and its folder name)")
        a("--max-queue-len", type=int, default=d["max_queue_len"].default,
          help="engine requests waiting for their first token before new ones get a 503")
        a("--chat-template", default=None, help="a Jinja chat template file (default: the tokenizer's)")
        a("--disable-log-stats", action="store_true", help="no periodic throughput line in the log")
        a("--log-stats-interval", type=float, default=d["log_stats_interval"].default,
          help="seconds between stats lines and stats updates of the front end")
        a("--expert-stats-file", default=None, help="write per-rank expert statistics JSON here (default: none)")
        a("--max-restarts", type=int, default=d["max_restarts"].default,
          help="restarts of the engine rank group after a rank dies, before giving up")
        a("--engine-hang-timeout", type=float, default=d["engine_hang_timeout"].default,
          help="seconds an engine rank may stay silent (hung step or collective) before it is killed and the "
               "rank group restarts")
        a("--enable-auto-tool-choice", action="store_true",
          help="let the model decide to call tools (tool_choice auto); needs --tool-call-parser")
        a("--tool-call-parser", choices=["hermes", "glm45"], default=None,
          help="the model's tool-call format: hermes (Qwen3's <tool_call>{json}</tool_call>) or glm45")
        a("--reasoning-parser", choices=["qwen3", "glm45", "deepseek_r1"], default=None,
          help="split the model's <think>...</think> part into reasoning_content")
        a("--generation-config", default=d["generation_config"].default,
          help="default temperature/top_p/top_k/min_p/repetition_penalty of requests that leave them unset: "
               "'auto' from the model's generation_config.json, 'vllm' none, or a folder holding one")
        return parser

    @staticmethod
    def from_cli(args: argparse.Namespace) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        kwargs = {k: v for k, v in vars(args).items() if k in names and v is not None}
        if "api_key" not in kwargs and os.environ.get("VLLM_API_KEY"):  # vLLM's variable: the key stays out of ps
            kwargs["api_key"] = os.environ["VLLM_API_KEY"]
        return EngineConfig(**kwargs)
