"""Problems for benchmarks/tune_attention.py: one paged KV cache + queries each, the kernel call, the torch
reference (fp32) and torch SDPA on contiguous KV (the baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton

from kernels.attention.decode import paged_attention_decode, paged_attention_decode_ref
from kernels.attention.decode_plan import decode_config_splits
from kernels.attention.prefill import paged_attention_prefill

HEAD_DIM, BLOCK = 128, 16
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
FP8_SCALES = (1.0, 0.5)  # k_scale, v_scale: the cache holds x / scale; N(0, 1) values sit well inside e4m3
DT = torch.bfloat16
DEVICE = "cuda"  # "cpu" (with TRITON_INTERPRET=1 and float16) for the smoke test in tests/
ROTATE_BYTES = 256 << 20  # decode timing: KV pages cycled per graph replay, ~5x the H200's L2 (no flush needed)


def paged_cache(batch: int, ctx: int, kv_heads: int, kv: str, seed: int = 0):
    # randomly permuted pages (no two consecutive blocks adjacent in memory, as after a while of serving)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    blocks_per_seq = triton.cdiv(ctx, BLOCK)
    num_blocks = batch * blocks_per_seq
    k = torch.randn(num_blocks, BLOCK, kv_heads, HEAD_DIM, device=DEVICE, dtype=DT, generator=g)
    v = torch.randn(num_blocks, BLOCK, kv_heads, HEAD_DIM, device=DEVICE, dtype=DT, generator=g)
    if kv == "fp8":
        k, v = k.to(KV_DTYPES[kv]), v.to(KV_DTYPES[kv])
    tables = torch.randperm(num_blocks, device=DEVICE, generator=g).to(torch.int32).view(batch, blocks_per_seq)
    return k, v, tables


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, ctx: int, scale: float) -> torch.Tensor:
    # [batch, ctx, kv_heads, head_dim] in bf16 (an FP8 cache dequantized)
    kv = cache[tables.long()].flatten(1, 2)[:, :ctx]
    return (kv.float() * scale).to(DT) if kv.dtype != DT else kv


@dataclass
class DecodeCase:
    batch: int
    ctx: int
    kv: str
    heads: int = 32
    kv_heads: int = 4
    t: dict = field(default_factory=dict)  # the tensors, between build() and free()
    sdpa: list | None = None  # the baseline's calls (decode: one per rotation)
    rotations: int = 1  # disjoint page sets (block tables) over one pool, set by build(): one per timed call

    @property
    def name(self) -> str:
        return f"decode B={self.batch} ctx={self.ctx} {self.kv} {self.heads}/{self.kv_heads}"

    @property
    def scales(self) -> tuple[float, float]:
        return FP8_SCALES if self.kv == "fp8" else (1.0, 1.0)

    def kv_bytes(self) -> int:
        return 2 * self.batch * self.ctx * self.kv_heads * HEAD_DIM * KV_DTYPES[self.kv].itemsize

    def splits(self, cfg: dict, num_sms: int) -> int:
        # what paged_attention_decode picks: the block table is exactly as wide as the context
        return decode_config_splits(cfg, self.batch, self.kv_heads, triton.cdiv(self.ctx, BLOCK) * BLOCK, num_sms)

    def build(self) -> None:
        # a pool of `rotations` x the pages one call reads, and one block table per page set: the timed graph
        # runs the call once per table, so no call finds its KV in L2 from the one before (a small case's 8 MB
        # would), with no flush to subtract
        self.rotations = max(1, min(32, -(-ROTATE_BYTES // self.kv_bytes()))) if DEVICE != "cpu" else 2
        k, v, tables = paged_cache(self.batch * self.rotations, self.ctx, self.kv_heads, self.kv)
        tables = tables.view(self.rotations, self.batch, -1)  # [rotations, batch, blocks_per_seq]
        q = torch.randn(self.batch, self.heads, HEAD_DIM, device=DEVICE, dtype=DT)
        lens = torch.full((self.batch,), self.ctx, device=DEVICE, dtype=torch.int32)
        self.t = {"q": q, "k": k, "v": v, "lens": lens, "tables": tables[0], "all_tables": tables}
        if self.batch * self.ctx <= 1 << 21:  # SDPA gets its own contiguous bf16 copies, one per rotation
            qs = q[:, :, None, :]
            self.sdpa = []
            for tb in tables:
                kc = contiguous_kv(k, tb, self.ctx, self.scales[0]).transpose(1, 2)
                vc = contiguous_kv(v, tb, self.ctx, self.scales[1]).transpose(1, 2)
                self.sdpa.append(lambda kc=kc, vc=vc: F.scaled_dot_product_attention(qs, kc, vc, scale=HEAD_DIM**-0.5,
                                                                                      enable_gqa=True))

    def run(self, cfg: dict, splits: int, rotation: int = 0) -> torch.Tensor:
        t = self.t
        return paged_attention_decode(t["q"], t["k"], t["v"], t["lens"], t["all_tables"][rotation], HEAD_DIM**-0.5,
                                      *self.scales, num_splits=splits, config=cfg)

    def reference(self) -> torch.Tensor:
        t = self.t
        return paged_attention_decode_ref(t["q"], t["k"], t["v"], t["lens"], t["tables"], HEAD_DIM**-0.5,
                                          *self.scales)

    def free(self) -> None:
        self.t, self.sdpa = {}, None
        torch.cuda.empty_cache()


@dataclass
class PrefillCase:
    q_len: int
    prefix: int  # cached tokens before the chunk: 0 = a plain causal prefill
    kv: str
    heads: int = 32
    kv_heads: int = 4
    t: dict = field(default_factory=dict)
    sdpa: list | None = None  # the baseline's calls (decode: one per rotation)
    batch: int = 1  # sequences of q_len new tokens each (a varlen launch of equal lengths)

    @property
    def kind(self) -> str:
        return "extend" if self.prefix else "prefill"

    @property
    def name(self) -> str:
        many = f"{self.batch}x" if self.batch > 1 else ""
        return f"{self.kind} {many}{self.q_len}+{self.prefix} {self.kv} {self.heads}/{self.kv_heads}"

    @property
    def scales(self) -> tuple[float, float]:
        return FP8_SCALES if self.kv == "fp8" else (1.0, 1.0)

    def flops(self) -> float:
        return 4 * self.batch * self.heads * HEAD_DIM * self.q_len * (self.prefix + self.q_len / 2)

    def build(self) -> None:
        kv_len, nb = self.prefix + self.q_len, self.batch
        k, v, tables = paged_cache(nb, kv_len, self.kv_heads, self.kv, seed=1)
        q = torch.randn(nb * self.q_len, self.heads, HEAD_DIM, device=DEVICE, dtype=DT)
        cu = torch.arange(nb + 1, device=DEVICE, dtype=torch.int32) * self.q_len
        lens = torch.full((nb,), kv_len, device=DEVICE, dtype=torch.int32)
        kc = contiguous_kv(k, tables, kv_len, self.scales[0])  # [batch, kv_len, kv_heads, d] bf16
        vc = contiguous_kv(v, tables, kv_len, self.scales[1])
        # this step's K/V as the model has them before the cache store ([tokens, kv_heads, d]): a config's RAGGED
        # reads the chunk from here (a bf16 cache only; an FP8 one is read back from the pages)
        k_new = kc[:, self.prefix :].reshape(-1, self.kv_heads, HEAD_DIM).contiguous()
        v_new = vc[:, self.prefix :].reshape(-1, self.kv_heads, HEAD_DIM).contiguous()
        self.t = {"q": q, "k": k, "v": v, "cu": cu, "lens": lens, "tables": tables, "k_new": k_new, "v_new": v_new}
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)  # [batch, kv_heads, kv_len, d]
        qs = q.view(nb, self.q_len, self.heads, HEAD_DIM).transpose(1, 2)  # [batch, heads, q_len, d]
        if not self.prefix:
            self.sdpa = [lambda: F.scaled_dot_product_attention(qs, kc, vc, scale=HEAD_DIM**-0.5, is_causal=True,
                                                                enable_gqa=True)]
            return
        from torch.nn.attention.bias import causal_lower_right

        group = self.heads // self.kv_heads  # the lower-right causal bias path takes no enable_gqa: repeat KV
        kr, vr = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
        mask = causal_lower_right(self.q_len, kv_len)
        self.sdpa = [lambda: F.scaled_dot_product_attention(qs, kr, vr, attn_mask=mask, scale=HEAD_DIM**-0.5)]

    def run(self, cfg: dict) -> torch.Tensor:
        t = self.t
        return paged_attention_prefill(t["q"], t["k"], t["v"], t["cu"], t["lens"], t["tables"], HEAD_DIM**-0.5,
                                       self.q_len, *self.scales, config=cfg, k=t["k_new"], v=t["v_new"])

    def reference(self) -> torch.Tensor:
        # fp32, per sequence, query rows in chunks so that one chunk's scores stay under ~4 GB
        t = self.t
        kv_len = self.prefix + self.q_len
        group = self.heads // self.kv_heads
        rows = max(16, 2 ** int(math.log2(max(1, (1 << 30) // (self.heads * kv_len)))))
        out = torch.empty_like(t["q"])
        pos = torch.arange(kv_len, device=DEVICE)
        for b in range(self.batch):
            k = t["k"][t["tables"][b].long()].flatten(0, 1)[:kv_len].float() * self.scales[0]  # [kv_len, kvh, d]
            v = t["v"][t["tables"][b].long()].flatten(0, 1)[:kv_len].float() * self.scales[1]
            for r0 in range(0, self.q_len, rows):
                t0 = b * self.q_len + r0
                q = t["q"][t0 : t0 + min(rows, self.q_len - r0)].float().view(-1, self.kv_heads, group, HEAD_DIM)
                s = torch.einsum("ckgd,nkd->kgcn", q, k) * HEAD_DIM**-0.5  # [kvh, g, c, kv_len]
                q_pos = self.prefix + r0 + torch.arange(q.shape[0], device=DEVICE)
                s.masked_fill_(pos[None, :] > q_pos[:, None], float("-inf"))
                o = torch.einsum("kgcn,nkd->ckgd", s.softmax(-1), v)
                out[t0 : t0 + q.shape[0]] = o.reshape(q.shape[0], self.heads, HEAD_DIM).to(out.dtype)
                del s
        return out

    def free(self) -> None:
        self.t, self.sdpa = {}, None
        torch.cuda.empty_cache()


DECODE_CASES = [DecodeCase(b, ctx, kv) for kv in ("bf16", "fp8")
                for b, ctx in ((1, 4096), (1, 32768), (1, 131072), (16, 4096), (64, 4096))]
EXTEND_CASES = [PrefillCase(8192, 122880, "bf16"), PrefillCase(8192, 122880, "fp8"),
                PrefillCase(8192, 122880, "bf16", 96, 8)]
PREFILL_CASES = [PrefillCase(n, 0, "bf16") for n in (1024, 4096, 16384)] + [PrefillCase(2048, 0, "bf16", batch=4)]
