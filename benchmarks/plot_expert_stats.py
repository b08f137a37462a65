"""Expert-load heatmap and per-rank imbalance from an --expert-stats-file JSON.

  python benchmarks/plot_expert_stats.py expert_stats.json [--out expert_stats.png]

Top: routed tokens per (MoE layer, expert), summed over the ranks that routed them, with the EP owner of each
expert block marked. Bottom: per layer, the load each EP rank receives (tokens routed to its experts):
max/mean over ranks (1.0 = perfectly balanced), and the same over experts.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def load(path: str) -> tuple[np.ndarray, dict]:
    with open(path) as f:
        data = json.load(f)
    ranks = data["ranks"]
    counts = np.array([r["routed_tokens"] for r in ranks], dtype=np.int64)  # [ranks, layers, experts]
    return counts, data


def imbalance(routed: np.ndarray, num_ep_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """routed: [layers, experts] -> (per-layer max/mean over EP ranks, per-layer max/mean over experts)."""
    layers, experts = routed.shape
    per_rank = routed.reshape(layers, num_ep_ranks, experts // num_ep_ranks).sum(axis=2)  # [layers, ranks]
    rank_imb = per_rank.max(axis=1) / np.maximum(per_rank.mean(axis=1), 1e-9)
    expert_imb = routed.max(axis=1) / np.maximum(routed.mean(axis=1), 1e-9)
    return rank_imb, expert_imb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stats_file")
    parser.add_argument("--out", default=None, help="PNG path (default: the stats file with .png)")
    parser.add_argument("--ep-size", type=int, default=None, help="EP ranks owning experts (default: ranks in file)")
    args = parser.parse_args()
    counts, data = load(args.stats_file)
    routed = counts.sum(axis=0)  # [layers, experts]
    num_layers, num_experts = routed.shape
    ep = args.ep_size or max(len(data["ranks"]), 1)
    if num_experts % ep:
        ep = 1
    rank_imb, expert_imb = imbalance(routed, ep)
    sent = sum(r["all2all_bytes_sent"] for r in data["ranks"])
    allgather = sum(sum(r.get("all2all_layer_allgather_bytes", [])) for r in data["ranks"])
    print(f"expert_stats: layers={num_layers} experts={num_experts} ep={ep} tokens_routed={int(routed.sum())} "
          f"rank_imbalance_mean={rank_imb.mean():.3f} rank_imbalance_max={rank_imb.max():.3f} "
          f"expert_imbalance_mean={expert_imb.mean():.3f} all2all_MB_sent={sent / 1e6:.2f} "
          f"allgather_equivalent_MB={allgather / 1e6:.2f}")

    try:  # plotting is optional: the summary line above is what scripts and tests read
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return

    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(max(6, num_experts / 8), 8),
                                   gridspec_kw={"height_ratios": [2, 1]})
    im = ax0.imshow(routed, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax0, label="routed tokens")
    for r in range(1, ep):
        ax0.axvline(r * num_experts / ep - 0.5, color="white", linewidth=1)
    ax0.set_xlabel(f"expert (white lines: EP rank boundaries, {ep} ranks)")
    ax0.set_ylabel("MoE layer")
    ax0.set_title("Routed tokens per expert")
    ax1.plot(range(num_layers), rank_imb, marker="o", label="EP ranks: max/mean")
    ax1.plot(range(num_layers), expert_imb, marker=".", label="experts: max/mean")
    ax1.axhline(1.0, color="gray", linewidth=0.5)
    ax1.set_xlabel("MoE layer")
    ax1.set_ylabel("imbalance")
    ax1.legend()
    split = {k: v for k, v in data["ranks"][0].get("time_split", {}).items() if k != "total"} if data["ranks"] else {}
    if split:
        total = max(sum(split.values()), 1e-9)
        ax1.set_title("rank 0 step time: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in split.items()),
                      fontsize=9)
    fig.tight_layout()
    out = args.out or args.stats_file.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
