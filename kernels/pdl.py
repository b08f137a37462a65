"""Programmatic dependent launch (PDL, sm90+) for the kernels of a decode step, behind one switch.

At batch 1 a decode layer is ~11 kernels of 1-25 us, and each kernel boundary costs a fixed launch, CTA
scheduling and prologue time. A kernel launched with `launch_pdl=True` may be scheduled while its predecessor in
the stream still runs: `griddepcontrol.wait` (gdc_wait) then blocks until the predecessor grid has completed and
its memory is visible, and `griddepcontrol.launch_dependents` (gdc_launch_dependents) lets the successor be
scheduled once every CTA of this grid has executed it or exited.

The switch: on by default on a Hopper GPU (compute capability 9: griddepcontrol is sm_90 PTX, and PDL is tested
there alone), `MOE_RT_PDL=0` in the environment (read once) turns it off; everywhere else, the CPU interpreter
included, PDL is off. Measured on an H200 (2026-11-29, benchmarks/RESULTS.md), Qwen3-30B-A3B decode step at batch
1: bf16 3.19 -> 2.97 ms, FP8 2.80 -> 2.57 ms; outputs bit for bit those without PDL (tests/test_pdl.py, 200 graph
replays at 1 / 8 / 64 tokens). Each kernel takes a `PDL: tl.constexpr` and calls pdl_wait / pdl_release, which
compile to nothing when it is False, and its wrapper launches with launch_kwargs(pdl). With the switch off the
kernels are compiled and launched without PDL, except the MoE GEMV pair where its table's "pdl" variant says so
(the H200 tables at 1 and 8 tokens; kernels/moe_gemv.py).

The safety rule, kept by EVERY kernel that takes PDL (tests/test_pdl.py checks it on the sm90 PTX):
  (1) before its gdc_wait: no stores at all, and loads only of data that no kernel of the forward writes
      (weights, norm weights, weight scales, the cos/sin cache, the step's sequence lengths and block tables),
      never activations, ids, positions or counters. The predecessor may still be writing those; in a CUDA graph
      (and with the caching allocator) a tensor freed after kernel N was enqueued can be reused by kernel N+1's
      outputs, so an early store could clobber what N still reads; and a load of mutable data could hit an SM's L1
      line left stale by an earlier kernel. Weights are written once at load time, so both hazards are absent for
      them. So are a step's sequence lengths and block tables: copied in by non-PDL ops (host copies, torch) before
      the forward's first kernel, alive for the whole forward, written by no kernel of it. And, in a decode step,
      the cache rows of the sequences' earlier tokens: decode attention runs in pure decode steps only (one new
      token per sequence; mixed steps take the prefill kernel), whose one K/V store per sequence and layer is the
      new token's row, by that layer's prologue (or by the fused decode kernel itself); the earlier rows were
      stored by earlier forwards (prefix-cache hits share full blocks only). (Safe; decode attention reads the
      step inputs before its wait only where its config's early_inputs says, and the cache rows never: sessions 16-17,
      20.)
  (1') the one exception: data written two or more kernels back, by a kernel that itself waited before it
      released (every kernel here), may be read before the wait. When kernel N+1 starts, kernel N has passed its
      wait, so N-1 has completed and its stores are in memory before N+1's first instruction (and N+1's L1 starts
      after them). The MoE GEMV down kernel reads the router's topk ids (written before the up kernel) and, through
      them, its first weight tile this way; nothing else does.
  (2) gdc_wait.
  (3) gdc_launch_dependents only after its own gdc_wait. Then, transitively, when kernel N+1 starts every kernel
      before N has completed, and when N+1 passes its wait, N has too: every kernel's post-wait part runs after all
      earlier kernels completed, exactly as on a serialized stream. (A trigger before the wait would let N+1 start
      while N-1 still runs; N+1's wait covers N only, and N-1's stores are made visible to N by N's wait, which
      promises nothing to N+1. A kernel launched with PDL must also wait at all, even with nothing to read.)
A kernel launched without PDL (cuBLAS, torch ops, the sampler) waits for its predecessor to complete, as always,
and a PDL kernel after it finds it complete at its wait: mixed chains stay correct.

Each kernel here releases right after its wait: its dependents are scheduled once every CTA of its grid has passed
the wait (for a grid of one wave, at once), and they then run their weight prefetch (1) while this one computes.

What each kernel reads before its wait (tests/test_pdl.py checks these on the PTX):
  norm._rms_norm_kernel: the norm weight row; qkv_prologue: the q/k norm weights (cos/sin needs the positions);
  router_fused: the split's first [BLOCK_E, BLOCK_H] router-weight tile; linear.gemv (16-bit and FP8 weights): the first
  K step's weight tile; the MoE GEMV down kernel: the topk ids and its first weight tile (rule (1')); decode attention:
  with its config's early_inputs, the step's sequence length, block-table row and first page ids (the H200 table: an
  FP8 cache at batch <= 4, where it won: B=1 ctx 32k 3.348 -> 3.304 ms a step, 1k 2.762 -> 2.751, session 20; in
  bf16-cache steps it lost, 2.69 -> 2.73 ms, session 17), else nothing (its first K/V tile too lost, session 16).
  Nothing: the split merge (reduce), the MoE GEMV up kernel and the tl.dot experts (their weights follow the
  router's ids, the predecessor's output), moe_sum, the align kernels, the FP8 activation quant, GEMMs and split-K
  reduce. (Decode attention with the prologue fused in, kernels/attention/decode_fused.py: its q/k norm weights after
  the wait.)
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV_VAR = "MOE_RT_PDL"
# the interpreter has no griddepcontrol: kernels compiled with PDL=True still run there (their peeled first steps and
# early weight loads, checked against the references on the CPU), without the two instructions
_GDC = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@functools.cache
def env_switch() -> bool:
    """MOE_RT_PDL: unset / "" / "1" on, "0" off (read once; tests call env_switch.cache_clear())."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {value!r}")
    return value != "0"


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_supported(device: torch.device) -> bool:
    """Hopper (sm_90) only: griddepcontrol assembles for sm_90+, but PDL is tested on H100/H200 alone (another
    engine saw CUDA-graph capture fail with the PDL launch attribute on sm_120); the interpreter has no launch
    attribute to give."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) == 9


def pdl_enabled(device: torch.device) -> bool:
    """The global switch for the decode chain's kernels: a Hopper GPU, unless MOE_RT_PDL=0."""
    return env_switch() and pdl_supported(device)


def launch_kwargs(pdl: bool) -> dict:
    """Extra launch arguments of a Triton kernel compiled with PDL=pdl."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    # rule (2): from here on the predecessor grid has completed and its stores are visible
    if PDL:
        if _GDC:
            tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    # rule (3): call only after pdl_wait; the successor may be scheduled once every CTA got here (or exited)
    if PDL:
        if _GDC:
            tl.extra.cuda.gdc_launch_dependents()
