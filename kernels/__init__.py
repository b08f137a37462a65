"""Kernels: each file holds a Triton kernel, a checked wrapper and a torch reference of the same signature."""
