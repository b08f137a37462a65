"""Attention kernels: prefill and extend over the paged cache (prefill.py), split-K decode with its merge
(decode.py), the per-GPU tile tables (config.py), the FP8 KV helpers and e4m3 dots (fp8_dot.py), the shared
tile loaders (tiles.py), and the fused q/k norm + RoPE + KV store before them (qkv_prologue.py), or inside the decode
kernel (decode_fused.py, with the per-head math in prologue_rows.py)."""
