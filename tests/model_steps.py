"""Two sequences through a tiny model on the Triton path (the interpreter on the CPU): a prefill of both, then a decode
step of chosen sequences, optionally with a padding row (slot -1, seq_len 0) as a CUDA graph's bucket pads a decode
batch. Each step runs twice (the first warms lazily made workspaces, which are not launches); the second's logits and
launches are returned. For the tests that compare fusions on and off (tests/test_fusion_model_logits.py,
tests/test_decode_fused_model.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = 4
TABLES = [[3, 0, 5], [1, 4, 2], [6, 6, 6]]  # sequence 0's pages, sequence 1's, the padding row's
LENS = [5, 8]  # prompt lengths: sequence 1's decode token opens a new page


def two_sequence_logits(arch: str, decode_rows: list[int], pad: bool = False, dtype: torch.dtype = torch.float32,
                        setup: Callable[[torch.nn.Module], None] | None = None,
                        **overrides: Any) -> tuple[torch.Tensor, list[str], torch.nn.Module]:
    """(logits [prefill tokens + len(decode_rows), vocab], the Triton path's launches of both steps, the model); a
    tiny model of arch (overrides: config.json keys; GLM: dense, MoE, MoE layers), setup(model) before the steps;
    the fusion switches are read when its ModelArgs is made."""
    from benchmarks.count_launches import CONFIGS, count_launches
    from models.args import ModelArgs
    from models.forward_batch import ForwardBatch
    from models.loader import load_model
    from runtime.engine.attention_backend import triton_attention

    cfg = dict(CONFIGS[arch], num_hidden_layers=3 if arch == "glm4_moe" else 2, **overrides)
    model = load_model("", cfg, ModelArgs(dtype=dtype, device=DEV, use_triton=True, seed=3), "dummy")
    if setup is not None:
        setup(model)
    kv = [tuple(torch.zeros(7, PAGE, model.num_kv_heads, model.head_dim, device=DEV, dtype=dtype) for _ in "kv")
          for _ in range(model.num_layers)]
    tables = torch.tensor(TABLES, dtype=torch.int32, device=DEV)
    slot = lambda b, pos: int(tables[b, pos // PAGE]) * PAGE + pos % PAGE  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    toks = [torch.randint(0, cfg["vocab_size"], (n + 1,), generator=gen).tolist() for n in LENS]

    def step(rows: list[int], ids: list[int], pos: list[int], slots: list[int], seq_lens: list[int],
             decode: bool) -> torch.Tensor:
        i32 = dict(dtype=torch.int32, device=DEV)
        cu = list(range(len(ids) + 1)) if decode else [0, *torch.tensor(seq_lens).cumsum(0).tolist()]
        batch = ForwardBatch(slot_mapping=torch.tensor(slots, device=DEV), cu_seqlens_q=torch.tensor(cu, **i32),
                             seq_lens=torch.tensor(seq_lens, **i32), block_tables=tables[rows],
                             max_seqlen_q=1 if decode else max(seq_lens), max_seqlen_k=max(seq_lens), is_decode=decode,
                             kv_caches=kv, attn_backend=triton_attention())
        with torch.no_grad():
            return model.compute_logits(model(torch.tensor(ids, device=DEV), torch.tensor(pos, device=DEV), batch))

    prefill = ([0, 1], [t for p, n in zip(toks, LENS) for t in p[:n]], [i for n in LENS for i in range(n)],
               [slot(b, i) for b, n in enumerate(LENS) for i in range(n)], LENS)
    pad_row = [(2, 0, 0, -1, 0)] if pad else []  # (table row, token, position, slot, seq_len)
    decode = [list(c) for c in zip(*[(b, toks[b][LENS[b]], LENS[b], slot(b, LENS[b]), LENS[b] + 1)
                                     for b in decode_rows] + pad_row)]
    step(*prefill, decode=False)
    step(*decode, decode=True)
    with count_launches() as log:
        prefill_logits = step(*prefill, decode=False)
        decode_logits = step(*decode, decode=True)
    return torch.cat([prefill_logits, decode_logits[: len(decode_rows)]]), log.events, model
