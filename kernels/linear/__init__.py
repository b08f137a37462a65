"""Dense projections: the few-row GEMV with split K, bf16 or FP8 weight-only (gemv.py, its table gemv_config.py),
and the FP8 block-scaled W8A8 linear with per-token dynamic activation scales (w8a8.py, its Triton kernels
w8a8_kernels.py, its table w8a8_config.py)."""
