"""The control plane: DP coordinator and its router, a rank's loop, liveness, process control."""
