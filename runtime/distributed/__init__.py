"""Process groups (a DP x TP mesh, EP derived), all2all backends, expert statistics."""
