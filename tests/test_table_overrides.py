"""The A/B scripts that run a benchmark with a table changed in-process: benchmarks/gluon_off.py drops exactly the
tables' Gluon entries, benchmarks/cublas_off.py the FP8 linear table's cuBLAS routes, benchmarks/decode_knobs.py sets
decode-attention knobs; each runs the given script with its arguments."""

from __future__ import annotations

import os
import subprocess
import sys

from kernels.attention import config as attention_config
from kernels.linear import w8a8_config
from kernels.moe_config import CONFIG_DIR
from kernels.moe_config import _load as moe_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gluon_off import without_gluon_attention, without_gluon_moe  # noqa: E402


def test_gluon_entries_dropped_and_nothing_else():
    moe = str(CONFIG_DIR / "moe_E128_H2048_I768_bfloat16_NVIDIA_H200.json")
    table, stripped = moe_load(moe), without_gluon_moe(moe_load.__wrapped__)(moe)
    assert table[4096]["tma"]["gluon"] and "tma" not in stripped[4096]
    assert all(stripped[m] == {k: v for k, v in c.items() if k != "tma"} for m, c in table.items())
    attn = str(CONFIG_DIR / "attention_NVIDIA_H200.json")
    table, stripped = attention_config._load(attn), without_gluon_attention(attention_config._load.__wrapped__)(attn)
    assert table["prefill"]["d128_bf16"]["gluon"] and "gluon" not in stripped["prefill"]["d128_bf16"]
    assert stripped["decode"] == table["decode"]
    assert {k: v for k, v in table["prefill"]["d128_bf16"].items() if k != "gluon"} == stripped["prefill"]["d128_bf16"]


def test_runs_the_script_with_its_arguments(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import sys\nimport kernels.moe_config as mc\n"
                      "print(sys.argv[1:], mc._load.__name__)\n")
    out = subprocess.run([sys.executable, "benchmarks/gluon_off.py", str(script), "--x", "1"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['--x', '1'] wrapped"


def test_cublas_off_runs_the_script_without_the_route(tmp_path):
    # benchmarks/cublas_off.py, the same runner: in the script the H200 FP8 linear table routes nothing to cuBLAS
    script = tmp_path / "probe.py"
    script.write_text("import sys\nimport kernels.linear.w8a8_config as wc\n"
                      "t = wc._load(str(wc.CONFIG_DIR / wc.config_file_name('NVIDIA_H200')))\n"
                      "print(sys.argv[1:], sum(c.get('CUBLAS', 0) for b in t.values() for c in b.values()))\n")
    out = subprocess.run([sys.executable, "benchmarks/cublas_off.py", str(script), "--y"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['--y'] 0"
    routed = w8a8_config._load(str(w8a8_config.CONFIG_DIR / w8a8_config.config_file_name("NVIDIA_H200")))
    assert sum(c.get("CUBLAS", 0) for b in routed.values() for c in b.values()) > 0  # the table itself routes some


def test_decode_knobs_set_on_every_decode_config(tmp_path):
    # benchmarks/decode_knobs.py (a knob's A/B): every decode config of the H200 table and its small-batch config
    # take the knob, the prefill entries stay; a bad knob is one line
    from decode_knobs import parse_knobs, with_decode_knobs

    assert parse_knobs("programs_per_sm=1,BLOCK_N=32") == {"programs_per_sm": 1, "BLOCK_N": 32}  # the split rule too

    attn = str(CONFIG_DIR / "attention_NVIDIA_H200.json")
    table = attention_config._load(attn)
    got = with_decode_knobs(attention_config._load.__wrapped__, {"max_splits": 17})(attn)
    assert got["prefill"] == table["prefill"] and got["decode"].keys() == table["decode"].keys()
    for key, cfg in got["decode"].items():
        rest = ("max_splits", "small_batch_config")
        assert cfg["max_splits"] == 17 and {k: v for k, v in cfg.items() if k not in rest} \
            == {k: v for k, v in table["decode"][key].items() if k not in rest}
        assert not cfg.get("small_batch_config") or cfg["small_batch_config"]["max_splits"] == 17
    script = tmp_path / "probe.py"
    script.write_text("import sys\nimport torch\nimport kernels.attention.config as ac\n"
                      "print(sys.argv[1:], ac._load(str(ac.CONFIG_DIR / ac.config_file_name('NVIDIA_H200')))"
                      "['decode']['d128_fp8']['max_splits'])\n")
    run = [sys.executable, "benchmarks/decode_knobs.py"]
    out = subprocess.run([*run, "max_splits=17", str(script), "--z"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "['--z'] 17", out.stderr
    bad = subprocess.run([*run, "early=1", str(script)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not KEY=INT" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
