"""--async-scheduling: step s+1 is queued before step s's tokens are read (runtime/engine/async_step.py). On the
CPU the tokens must equal the synchronous engine's exactly: batches whose sequences end at different steps,
stop tokens and EOS, chunked prefill, prefix caching, preemption, aborts, seeded sampling with logprobs, and
requests that fall back to synchronous steps (grammar, penalties, bad words) mixed in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.messages import AddRequest
from tests.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runner shares two cores with other jobs; one thread is as fast here
    try:
        yield make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_async")), "Qwen3MoeForCausalLM")
    finally:
        torch.set_num_threads(threads)


def prompts(lengths: tuple[int, ...], seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=g).tolist()} for n in lengths]


def make_llm(path: str, async_scheduling: bool | None, **kw: Any) -> LLM:
    kw = {"dtype": "float32", "device": "cpu", "kv_cache_memory": 8 << 20, "block_size": 8, **kw}
    return LLM(model=path, async_scheduling=async_scheduling, **kw)


def results(outs: list[Any]) -> list[tuple[list[int], str | None, Any, int]]:
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason, o.num_cached_tokens)
            for o in outs]


def assert_no_leak(llm: LLM) -> None:
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished() and not llm.engine.requests and not llm.engine.step_pending


def both(path: str, batch: list[dict[str, Any]], params: list[SamplingParams], min_overlapped: int = 1,
         **kw: Any) -> tuple[list[Any], list[Any], LLM]:
    sync, overlapped = make_llm(path, False, **kw), make_llm(path, True, **kw)
    want, got = sync.generate(batch, params), overlapped.generate(batch, params)
    assert sync.engine.num_overlapped_steps == 0
    assert overlapped.engine.num_overlapped_steps >= min_overlapped  # the async path really ran
    assert_no_leak(sync)
    assert_no_leak(overlapped)
    return want, got, overlapped


def test_greedy_equal_with_different_ends_stop_tokens_and_eos(checkpoint: str) -> None:
    batch = prompts((5, 11, 17, 30, 9, 4))
    plain = [SamplingParams(temperature=0, max_tokens=m) for m in (7, 20, 13, 32, 3, 1)]
    sync = make_llm(checkpoint, False)
    ref = [o.outputs[0].token_ids for o in sync.generate(batch, plain)]
    params = list(plain)
    params[1] = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ref[1][4]])  # ends at its 5th token
    # EOS (id 0) made certain: at once, and after min_tokens (masked before, so that count must be right)
    params[2] = SamplingParams(temperature=0, max_tokens=13, logit_bias={0: 100.0})
    params[4] = SamplingParams(temperature=0, max_tokens=30, min_tokens=6, logit_bias={0: 100.0})
    want, got, _ = both(checkpoint, batch, params)
    assert results(got) == results(want)
    ends = [(len(t), r) for t, r, _, _ in results(got)]
    assert ends[1] == (ref[1].index(ref[1][4]) + 1, "stop") and ends[2] == (1, "stop") and ends[4] == (7, "stop")
    assert ends[0] == (7, "length") and ends[3] == (32, "length") and ends[5] == (1, "length")


def test_chunked_prefill_and_max_model_len(checkpoint: str) -> None:
    batch = prompts((19, 9, 23, 40), seed=1)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (12, 25, 6)]
    params.append(SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))  # runs into max_model_len
    want, got, _ = both(checkpoint, batch, params, max_num_batched_tokens=7, max_model_len=56)
    assert results(got) == results(want)
    assert len(got[3].outputs[0].token_ids) == 56 - 40 and got[3].outputs[0].finish_reason == "length"


def test_prefix_cache_hits_and_preemption(checkpoint: str) -> None:
    shared = prompts((24,), seed=2)[0]["prompt_token_ids"]
    a, b = shared + [7, 8, 9], shared + [11, 12, 13, 14, 15]
    params = SamplingParams(temperature=0, max_tokens=20)
    for llm_kw in ({}, {"num_gpu_blocks_override": 14, "max_model_len": 64}):
        sync, overlapped = make_llm(checkpoint, False, **llm_kw), make_llm(checkpoint, True, **llm_kw)
        # a first, then b and a repeat of a in one batch: the repeat hits every full block but the last
        runs = [[{"prompt_token_ids": a}], [{"prompt_token_ids": b}, {"prompt_token_ids": a}]]
        if llm_kw:  # 14 blocks of 8 tokens cannot hold 4 x 44 tokens: the newest get preempted
            runs = [prompts((17, 13, 15, 11), seed=3)]
        for run in runs:
            want = sync.generate(run, params)
            assert results(overlapped.generate(run, params)) == results(want)
        if not llm_kw:  # a follow-up turn: the blocks of the generated tokens are cached too (real tokens only)
            turn = [{"prompt_token_ids": a + want[1].outputs[0].token_ids + [5, 6]}]
            want = sync.generate(turn, params)
            assert results(overlapped.generate(turn, params)) == results(want)
            assert want[0].num_cached_tokens == 40  # 27 prompt + 20 output + 2 tokens: 5 full blocks
        if llm_kw:
            assert overlapped.engine.scheduler.num_preemptions > 0
        else:
            assert overlapped.engine.block_manager.num_prefix_hits == sync.engine.block_manager.num_prefix_hits > 0
        assert overlapped.engine.num_overlapped_steps > 0
        assert_no_leak(overlapped)


def test_abort_mid_stream(checkpoint: str) -> None:
    batch = [p["prompt_token_ids"] for p in prompts((6, 9, 12), seed=4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    runs = []
    for async_scheduling in (False, True):
        engine = make_llm(checkpoint, async_scheduling).engine
        for i, p in enumerate(batch):
            engine.add_request(AddRequest(str(i), p, params))
        out: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
        steps = 0
        while engine.has_unfinished():
            for d in engine.step():
                assert not (d.request_id == "1" and steps > 5), "a token of an aborted request was emitted"
                out[d.request_id].extend(d.new_token_ids)
            steps += 1
            if steps == 5:
                engine.abort_requests(["1"])  # its token of the step in flight (async) is discarded
        assert engine.block_manager.num_used_blocks == 0 and not engine.requests
        runs.append(out)
    sync, overlapped = runs
    assert overlapped["0"] == sync["0"] and overlapped["2"] == sync["2"] and len(sync["0"]) == 16
    assert len(sync["1"]) == 5 and len(overlapped["1"]) == 4  # the async engine emits each token a step later
    assert overlapped["1"] == sync["1"][:4]


def test_seeded_sampling_and_logprobs(checkpoint: str) -> None:
    batch = prompts((5, 13, 8), seed=5)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=s, max_tokens=m, logprobs=2)
              for s, m in ((1, 12), (2, 7), (3, 15))]
    want, got, _ = both(checkpoint, batch, params)
    assert results(got) == results(want)
    for w, g in zip(want, got):
        for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert lw.keys() == lg.keys() and all(abs(lw[t] - lg[t]) < 1e-5 for t in lw)


def test_host_token_requests_mixed_in(checkpoint: str) -> None:
    """A grammar, penalties and bad words read the previous token on the host before sampling: their steps read
    the step in flight's tokens early (after queuing the forward); prompt logprobs are read within their step."""
    from runtime.structured_output import GrammarCompiler

    sync = make_llm(checkpoint, False)
    compiler = GrammarCompiler(sync.tokenizer, sync.engine.hf_config.vocab_size, [0])
    batch = prompts((5, 9, 14, 7, 11), seed=6)
    params = [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0, max_tokens=40, grammar=compiler("regex", r"[a-c]{2,6}")),
        SamplingParams(temperature=0, max_tokens=18, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.3),
        SamplingParams(temperature=0.7, seed=9, max_tokens=30, grammar=compiler("choice", ["alpha", "beta"])),
        SamplingParams(temperature=0, max_tokens=10, bad_words_token_ids=[[5, 6]], prompt_logprobs=1),
    ]
    want = sync.generate(batch, params)
    overlapped = make_llm(checkpoint, True)
    got = overlapped.generate(batch, params)
    assert results(got) == results(want)
    assert got[1].outputs[0].finish_reason == "stop" and got[3].outputs[0].text in ("alpha", "beta")
    assert got[4].prompt_logprobs is not None and len(got[4].prompt_logprobs) == len(batch[4]["prompt_token_ids"])
    for lw, lg in zip(want[4].prompt_logprobs[1:], got[4].prompt_logprobs[1:]):
        assert lw.keys() == lg.keys() and all(abs(lw[t] - lg[t]) < 1e-5 for t in lw)
    assert overlapped.engine.num_overlapped_steps > 0
    assert_no_leak(overlapped)
    # penalties alone (the output history on the host every step): still overlapped, same tokens
    alone = make_llm(checkpoint, True)
    assert results(alone.generate(batch[2:3], params[2:3])) == results(want[2:3])
    assert alone.engine.num_overlapped_steps > 0


class _Timed:
    """Wraps a model method and adds up the seconds spent inside it."""

    def __init__(self, fn: Any, total: list[float]) -> None:
        self.fn, self.total = fn, total

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total[0] += time.perf_counter() - t0


def test_host_time_per_step(checkpoint: str) -> None:
    """Prints the host time of a decode step outside the model's own work (forward + logits): on a GPU that is
    the time the device waits per step when synchronous, and what async scheduling overlaps. Not asserted."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for num_seqs in (1, 64):
        batch = prompts((16,) * num_seqs, seed=7)
        for async_scheduling in (False, True):
            llm = make_llm(checkpoint, async_scheduling, max_num_seqs=64)
            model = llm.engine.runner.model
            spent = [0.0]
            model.forward, model.compute_logits = _Timed(model.forward, spent), _Timed(model.compute_logits, spent)
            llm.generate(batch, params)  # warm up
            spent[0], steps = 0.0, llm.engine.num_steps
            t0 = time.perf_counter()
            llm.generate(batch, params)
            wall = time.perf_counter() - t0
            steps = llm.engine.num_steps - steps
            host_ms = (wall - spent[0]) / steps * 1e3
            where = "overlapped with the device's step on a GPU" if async_scheduling else "the GPU waits this long"
            print(f"\nB={num_seqs} async_scheduling={async_scheduling}: {steps} steps, {wall / steps * 1e3:.2f} "
                  f"ms/step, host {host_ms:.2f} ms/step outside forward + logits ({where})")


@pytest.mark.slow
def test_openai_server_with_async_scheduling(checkpoint: str) -> None:
    """python -m runtime.serve --async-scheduling: the rank loop's free-running path; greedy text equals the
    offline synchronous engine's."""
    import json

    from tests.test_all2all import free_port
    from tests.test_serve import _http, served

    port = free_port()
    body = {"model": "tiny", "prompt": "Hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with served(checkpoint, dp=1, ep=False, headless=False,
                extra=["--port", str(port), "--served-model-name", "tiny", "--async-scheduling"]) as (_, proc):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while _http(f"{base}/health", timeout_s=2)[0] != 200:
            assert proc.poll() is None, "runtime.serve exited"
            assert time.monotonic() < deadline, "API server not healthy after 90 s"
            time.sleep(0.1)
        answers = [_http(f"{base}/v1/completions", body) for _ in range(2)]
    offline = LLM(model=checkpoint, device="cpu", kv_cache_memory=8 << 20, max_model_len=256)
    want = offline.generate("Hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    for status, raw in answers:
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["usage"]["completion_tokens"] == 12
        assert answer["choices"][0]["text"] == want.outputs[0].text


@pytest.mark.slow
def test_dp2_ep2_lockstep_with_async_scheduling(tmp_path: Any) -> None:
    """Expert-parallel lockstep (rank loop + coordinator): each rank plans step s+1 while step s runs; greedy
    tokens equal one synchronous engine's, also with one rank busy and the other in dummy steps, and the last
    step's tokens come out although no step follows it."""
    from tests.test_serve import PROMPTS, reference_tokens, served

    model = make_tiny_checkpoint(str(tmp_path / "qwen3moe"), "Qwen3MoeForCausalLM")
    ref = reference_tokens(model, PROMPTS, 8)
    with served(model, dp=2, ep=True, extra=["--async-scheduling"]) as (front, _):
        front.submit("solo", PROMPTS[0], 8)  # one busy rank: the other pads with dummy steps
        front.wait_finished(120)
        assert front.tokens["solo"] == ref[0]
        for i, p in enumerate(PROMPTS):
            front.submit(str(i), p, 8)
        front.wait_finished(120)
        assert [front.tokens[str(i)] for i in range(len(PROMPTS))] == ref
        before = front.wait_stats(10).num_steps_issued
        time.sleep(1.5)
        assert front.wait_stats(10).num_steps_issued == before  # quiet when idle


def _tp_worker(rank: int, world: int, port: int, model: str, result_dir: str) -> None:
    import json
    import os

    from runtime.cluster.rank_loop import build_engine
    from runtime.config import EngineConfig
    from runtime.distributed.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config = EngineConfig(model=model, device="cpu", dtype="float32", kv_cache_memory=8 << 20, block_size=8,
                          max_num_batched_tokens=16, tensor_parallel_size=world, async_scheduling=True)
    parallel = init_parallel(config)
    engine, _ = build_engine(config, parallel)
    if parallel.is_tp_leader:
        for i, (p, sp) in enumerate(TP_REQUESTS):
            engine.add_request(AddRequest(str(i), p, sp))
        out: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for d in engine.step():
                out.setdefault(d.request_id, []).extend(d.new_token_ids)
        engine.runner.stop_followers()
        with open(os.path.join(result_dir, "tokens.json"), "w") as f:
            json.dump({"tokens": out, "overlapped": engine.num_overlapped_steps}, f)
    else:
        engine.runner.follow()
    with open(os.path.join(result_dir, f"grammar_warm_up{rank}.json"), "w") as f:
        json.dump(engine.structured._tokenizer is not None, f)  # the tokenizer view for grammars: TP rank 0 only
    destroy_parallel()


TP_REQUESTS = [(p["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
               for p, m in zip(prompts((5, 21, 9), seed=8), (12, 6, 17))]


@pytest.mark.slow
def test_tp2_async_scheduling_broadcasts_the_sampled_tokens(checkpoint: str) -> None:
    """TP=2 on gloo ranks: TP rank 0 samples; its peer gets the tokens of the step in flight by a broadcast on the
    TP group before each forward. Tokens equal one synchronous rank's, chunked prefill included."""
    import json
    import os
    import tempfile

    from tests.test_all2all import free_port, spawn_ranks

    sync = make_llm(checkpoint, False, max_num_batched_tokens=16)
    want = sync.generate([{"prompt_token_ids": p} for p, _ in TP_REQUESTS], [sp for _, sp in TP_REQUESTS])
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn_ranks(_tp_worker, (2, free_port(), checkpoint, d), 2, 120, "TP ranks")
        path = os.path.join(d, "tokens.json")
        assert os.path.exists(path), f"TP rank 0 crashed (exit code {ctx.processes[0].exitcode})"
        with open(path) as f:
            got = json.load(f)
        warmed = []
        for rank in range(2):
            with open(os.path.join(d, f"grammar_warm_up{rank}.json")) as f:
                warmed.append(json.load(f))
    assert warmed == [True, False]  # a TP peer never samples: no grammar tokenizer built at its start
    assert got["overlapped"] > 0
    assert [got["tokens"][str(i)] for i in range(len(TP_REQUESTS))] == [o.outputs[0].token_ids for o in want]


def test_on_by_default_off_by_flag_and_where_it_cannot_run(checkpoint: str, caplog: Any) -> None:
    """On unless --no-async-scheduling; under --lockstep-lookahead the default falls back to synchronous steps
    with one log line, while an explicit --async-scheduling there is a one-line error."""
    import argparse
    import logging

    from runtime.config import ConfigError, EngineConfig
    from runtime.engine.llm_engine import LLMEngine

    parser = EngineConfig.add_cli_args(argparse.ArgumentParser())

    def config(*flags: str) -> EngineConfig:
        args = ["--model", checkpoint, "--device", "cpu", "--kv-cache-memory", str(8 << 20), *flags]
        return EngineConfig.from_cli(parser.parse_args(args))

    assert config().async_scheduling is None and config().use_async_scheduling
    assert config("--async-scheduling").use_async_scheduling
    assert not config("--no-async-scheduling").use_async_scheduling
    assert make_llm(checkpoint, None).engine.async_scheduling  # the offline API's default too
    lookahead = ("--data-parallel-size", "2", "--enable-expert-parallel", "--lockstep-lookahead")
    with pytest.raises(ConfigError, match="--async-scheduling cannot run with --lockstep-lookahead"):
        config(*lookahead, "--async-scheduling")
    assert not config(*lookahead, "--no-async-scheduling").use_async_scheduling
    fallback = config(*lookahead)
    assert not fallback.use_async_scheduling
    with caplog.at_level(logging.INFO, logger="runtime.engine.llm_engine"):
        assert not LLMEngine(fallback).async_scheduling
    assert [r.message for r in caplog.records if "async scheduling is off" in r.message] == [
        "rank 0: async scheduling is off with --lockstep-lookahead (expert-parallel lockstep): steps run "
        "synchronously"]
    assert config("--lockstep-lookahead").use_async_scheduling  # no lockstep (one DP rank): nothing to fall back


def test_a_step_no_step_can_follow_is_read_at_once(checkpoint: str) -> None:
    """The step whose sequences all end with it (max_tokens) has nothing to overlap with: execute() reads it, so a
    caller that stops when schedule() plans nothing (lockstep loops) never leaves a token unread."""
    engine = make_llm(checkpoint, True).engine
    engine.add_request(AddRequest("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    out = []
    while engine.schedule():
        out += engine.execute()
    assert [d.finish_reason for d in out] == [None, None, None, "length"]
    assert not engine.step_pending and engine.num_overlapped_steps == 3
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def test_fill_placeholders() -> None:
    import numpy as np

    from runtime.engine.async_step import fill_placeholders

    prev = torch.tensor([40, 41, 42, 43])
    steady = np.array([-1, -2, -3])  # the same sequences in the same order: a view, no kernel
    assert fill_placeholders(torch.from_numpy(steady), prev, steady).tolist() == [40, 41, 42]
    mixed = np.array([-2, -4, 7, 8, 9, -1])  # one ended (row 2), a prefill chunk, a prompt's first token
    assert fill_placeholders(torch.from_numpy(mixed), prev, mixed).tolist() == [41, 43, 7, 8, 9, 40]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_async_equal_and_decode_never_syncs(tmp_path: Any) -> None:
    """CUDA graphs + Triton: the same tokens as the synchronous engine, and a decode step never waits for the
    stream (torch's sync debug mode raises on any stream or device sync; the event wait for the previous
    step's tokens is the one wait, and it is no stream sync)."""
    import importlib.util

    from runtime.structured_output import GrammarCompiler

    path = make_tiny_checkpoint(str(tmp_path / "qwen3moe"), "Qwen3MoeForCausalLM")
    with_grammar = importlib.util.find_spec("llguidance") is not None  # (the GPU image may lack it)
    batch = [p["prompt_token_ids"] for p in prompts((5, 11, 17, 33, 2, 9, 6, 8)[: 8 if with_grammar else 7])]
    compiler = None
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, min_tokens=4),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logit_bias={7: 1.0}),
              SamplingParams(temperature=1.0, top_k=20, seed=4, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.2,
                             frequency_penalty=0.4, bad_words_token_ids=[[9], [3, 4]])]
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(model=path, dtype="float32", device="cuda", block_size=16, kv_cache_memory=64 << 20,
                  async_scheduling=async_scheduling)
        if with_grammar and compiler is None:
            compiler = GrammarCompiler(llm.tokenizer, llm.engine.hf_config.vocab_size, [0])
        if compiler is not None and len(params) < len(batch):  # a grammar: its mask reaches the device, no sync
            params.append(SamplingParams(temperature=0, max_tokens=40, grammar=compiler("regex", "[a-z]{12,20}")))
        engine = llm.engine
        for i, (p, sp) in enumerate(zip(batch, params)):
            engine.add_request(AddRequest(str(i), p, sp))
        out: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
        while engine.has_unfinished():
            decode = all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running) \
                and not engine.scheduler.waiting
            torch.cuda.set_sync_debug_mode("error" if decode and async_scheduling else 0)
            try:
                deltas = engine.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            for d in deltas:
                out[d.request_id].extend(d.new_token_ids)
        assert engine.block_manager.num_used_blocks == 0
        runs.append(out)
        if async_scheduling:
            assert engine.num_overlapped_steps > 20
    assert runs[1] == runs[0]
