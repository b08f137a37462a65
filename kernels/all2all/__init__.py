"""The expert all2all's kernels (runtime/distributed/all2all_sparse.py): route.py lays out each token's destinations
and rows, pack.py packs the send rows (FP8 optionally), unpacks them, combines the replies and counts the exchanged
pairs."""
