"""One engine rank's core: scheduler, paged KV block manager, model runner, CUDA graphs, sampler."""
