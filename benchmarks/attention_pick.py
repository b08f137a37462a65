"""The attention table from benchmarks/tune_attention.py's timed rows: per table key the config with the best
geometric mean over its cases (decode: one for the small batches, one for the rest), merged over the checked-in
table. Rows: {"kind", "case", "kv", "cfg", "frac", ...; decode also "batch"}."""

from __future__ import annotations

import json
import math

import attention_cases as ac

from kernels.attention.config import DECODE_KNOB_DEFAULTS, PREFILL_KNOB_DEFAULTS, config_key

SMALL_BATCH = 4  # the table's decode entry: a config of its own for batch <= SMALL_BATCH (tuned on the B=1 cases)
# prefill keys this tuner never sweeps, set in the checked-in table from other benches (the Gluon kernel and the
# query length it runs from, bench_attention.py --gluon; the FP8 scratch's knobs): a pick keeps them
UNSWEPT_PREFILL_KEYS = ("gluon", *PREFILL_KNOB_DEFAULTS)
# decode knobs it never sweeps (set by hand from bench_attention.py --decode-merge and from decode_knobs.py A/Bs of
# engine steps, gpu_next phases Y and Z): a pick keeps them, per batch class
UNSWEPT_DECODE_KEYS = ("fused_merge_max_splits", "early_inputs")


def _keep_unswept(new: dict, prev: dict) -> dict:
    return {**new, **{x: prev[x] for x in UNSWEPT_DECODE_KEYS if x in prev}}


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs)) if xs else 0.0


def pick(rows: list[dict], pick_ragged: bool = False) -> dict:
    """Per table key: the config with the best geometric mean of frac over the key's cases (every case timed).
    RAGGED prefill configs only with pick_ragged (they need the caller to pass this step's K/V)."""
    table: dict[str, dict] = {}
    for kind in ("decode", "prefill"):
        mine = [r for r in rows if (r["kind"] == "decode") == (kind == "decode")
                and (pick_ragged or not r["cfg"].get("RAGGED"))]
        for kv in sorted({r["kv"] for r in mine}):
            sub = [r for r in mine if r["kv"] == kv]
            cases = {r["case"] for r in sub}
            by_cfg: dict[str, list[float]] = {}
            for r in sub:
                by_cfg.setdefault(json.dumps(r["cfg"], sort_keys=True), []).append(r["frac"])
            full = {c: geomean(f) for c, f in by_cfg.items() if len(f) == len(cases)}
            if full:
                best = max(full, key=full.get)
                key = config_key(ac.HEAD_DIM, ac.KV_DTYPES[kv])
                table.setdefault(kind, {})[key] = dict(json.loads(best), geomean_frac=full[best])
    return table


def pick_small_batch(rows: list[dict], table: dict) -> dict:
    """Decode entries with both small (batch <= SMALL_BATCH) and larger cases: the config with the best geometric
    mean over the larger cases, carrying the best one over the small cases as its small_batch_config. An entry whose
    cases are of one class only (the other's skipped for the budget) stays pick's choice, marked with that class
    (batch_class "small" / "large"): merge_table then keeps the checked-in config of the other class."""
    for key, entry in table.get("decode", {}).items():
        sub = [r for r in rows if r["kind"] == "decode" and config_key(ac.HEAD_DIM, ac.KV_DTYPES[r["kv"]]) == key]
        small = pick([r for r in sub if r["batch"] <= SMALL_BATCH]).get("decode", {}).get(key)
        large = pick([r for r in sub if r["batch"] > SMALL_BATCH]).get("decode", {}).get(key)
        if bool(small) != bool(large):
            entry["batch_class"] = "small" if small else "large"
        if small and large:
            small_frac, large_frac = small.pop("geomean_frac"), large.pop("geomean_frac")
            entry.clear()
            entry.update(large, geomean_frac=large_frac)
            if small != large:
                entry.update(small_batch=SMALL_BATCH, small_batch_config=small, small_batch_geomean_frac=small_frac)
    return table


def _merge_decode(prev: dict, new: dict, batch_class: str | None) -> dict:
    # a decode pick over the checked-in entry prev: one batch class (batch_class "small" / "large") or both (None);
    # each class keeps its own UNSWEPT_DECODE_KEYS (the small class: prev's small config's, else prev's own)
    prev_small = {**DECODE_KNOB_DEFAULTS, **(prev.get("small_batch_config") or prev)}
    if batch_class == "small":
        return {**prev, "small_batch": SMALL_BATCH, "small_batch_config": _keep_unswept(new, prev_small)}
    if batch_class is None and not new.get("small_batch_config") and any(
            prev_small.get(x) != prev.get(x) for x in UNSWEPT_DECODE_KEYS):  # one pick, two classes' knobs
        small = {x: y for x, y in new.items() if x not in ("small_batch", "small_batch_config")}
        new = {**new, "small_batch": SMALL_BATCH, "small_batch_config": small}
    new = _keep_unswept(new, prev)
    if batch_class == "large" and prev.get("small_batch_config"):
        return {**new, "small_batch": prev["small_batch"], "small_batch_config": prev["small_batch_config"]}
    if new.get("small_batch_config"):
        new["small_batch_config"] = _keep_unswept(new["small_batch_config"], prev_small)
    return new


def merge_table(old: dict, table: dict) -> dict:
    """The table file to write: the checked-in one (old) with this run's picks over it key by key, so that a kind
    (--only) or a cache dtype this run did not time (its cases skipped for the budget) keeps its checked-in entry
    and the file can be copied as is. The picks lose their geomean_frac bookkeeping. A decode pick timed on one
    batch class only (pick_small_batch's batch_class) replaces that class's config in the checked-in entry: a B=1
    pick becomes its small_batch_config, not the config of every batch; a pick over the larger batches keeps the
    checked-in small_batch_config. A decode entry this run writes gets every knob (DECODE_KNOB_DEFAULTS for those a
    checked-in entry predates, e.g. fp8_dot), so the file passes check_config as it is, and keeps each class's
    UNSWEPT_DECODE_KEYS; a prefill pick keeps the checked-in entry's UNSWEPT_PREFILL_KEYS."""
    written = {kind: dict(entries) for kind, entries in old.items()}
    for kind, entries in table.items():
        for key, cfg in entries.items():
            new = {x: y for x, y in cfg.items() if not x.endswith("geomean_frac") and x != "batch_class"}
            prev = written.get(kind, {}).get(key)
            if prev and kind == "decode":
                written.setdefault(kind, {})[key] = _merge_decode({**DECODE_KNOB_DEFAULTS, **prev}, new,
                                                                  cfg.get("batch_class"))
                continue
            if prev and kind == "prefill":
                new.update({x: prev[x] for x in UNSWEPT_PREFILL_KEYS if x in prev})
            written.setdefault(kind, {})[key] = new
    return written
