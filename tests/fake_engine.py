"""A model-free stand-in for the coordinator and engine ranks, speaking the real socket protocol.

It lets the front end be tested, and its own ceiling measured, with no model: a request's i-th output
token is prompt[i % len(prompt)], one token per tick for every active request (max_tokens,
stop_token_ids, logprobs, aborts and re-submissions after a restart honored).

    python -m tests.fake_engine --model MODEL_DIR --port 8000 --tick-ms 10
    python -m benchmarks.bench_serving --port 8000 --max-concurrency 256 --output-len 256
"""

from __future__ import annotations

import argparse
import threading
import time

import zmq

from runtime.messages import (
    AbortRequest,
    AddRequest,
    Addresses,
    ClusterStats,
    OutputBatch,
    RankStats,
    TokenDelta,
    decode,
    encode,
)


class FakeEngine(threading.Thread):
    def __init__(self, addrs: Addresses, tick_s: float = 0.002, vocab_size: int = 512) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(addrs.to_coordinator)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(addrs.to_frontend)
        self.vocab_size = vocab_size
        self.tick_s = tick_s
        self.active: dict[str, tuple[AddRequest, int]] = {}
        self.received: dict[str, float] = {}  # monotonic time each request came in, until its first token
        self.added: list[AddRequest] = []
        self.aborted: list[str] = []
        self.paused = threading.Event()  # admit requests but generate nothing
        self.restart = threading.Event()  # drop every request, as dead ranks would, and count a restart
        self.stopping = threading.Event()
        self.num_generated = 0
        self.num_steps = 0
        self.num_restarts = 0

    def run(self) -> None:
        last_stats = 0.0
        next_tick = time.perf_counter()
        while not self.stopping.is_set():
            if self.restart.is_set():
                self.restart.clear()
                self.active.clear()
                self.received.clear()
                self.num_restarts += 1
                last_stats = 0.0
            while self.pull.poll(0):
                self._handle(decode(self.pull.recv()))
            if not self.paused.is_set():
                self._tick()
            if time.time() - last_stats > 0.05:
                last_stats = time.time()
                stats = RankStats(
                    0, len(self.active), 0, min(1.0, len(self.active) / 1024), 0, self.num_generated, self.num_steps, 0
                )
                self.push.send(encode(ClusterStats(ranks=[stats], num_engine_restarts=self.num_restarts)))
            next_tick = max(next_tick + self.tick_s, time.perf_counter())
            # wait for the next tick, but wake for new requests (an idle engine sits here)
            timeout_ms = max(0.0, next_tick - time.perf_counter()) * 1e3
            if self.pull.poll(timeout_ms):
                next_tick = max(next_tick, time.perf_counter())
        self.pull.close(0)
        self.push.close(0)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, AddRequest):
            self.added.append(msg)
            self.active[msg.request_id] = (msg, 0)
            self.received[msg.request_id] = time.monotonic()
        elif isinstance(msg, AbortRequest):
            for rid in msg.request_ids:
                self.aborted.append(rid)
                self.active.pop(rid, None)
                self.received.pop(rid, None)

    def _tick(self) -> None:
        deltas = []
        for rid, (req, i) in list(self.active.items()):
            p = req.params
            # a re-submitted request carries its earlier output at the end of the prompt
            prompt = req.prompt_token_ids[: len(req.prompt_token_ids) - req.num_generated_before]
            i = max(i, req.num_generated_before)
            token = prompt[i % len(prompt)]
            reason = None
            if p.stop_token_ids and token in p.stop_token_ids:
                reason = "stop"
            elif p.max_tokens is not None and i + 1 >= p.max_tokens:
                reason = "length"
            lps = None
            if p.logprobs is not None:
                lps = [[(token, -0.5)] + [((token + k) % self.vocab_size, -1.0 - k) for k in range(p.logprobs)]]
            delta = TokenDelta(rid, [token], lps, reason, token if reason == "stop" else None)
            received = self.received.pop(rid, None)
            if received is not None:  # the first token: waited for this tick, produced in it (no prefill)
                delta.queue_time, delta.prefill_time = time.monotonic() - received, 0.0
            deltas.append(delta)
            self.num_generated += 1
            if reason is None:
                self.active[rid] = (req, i + 1)
            else:
                del self.active[rid]
        if deltas:
            self.num_steps += 1
            self.push.send(encode(OutputBatch(rank=0, outputs=deltas)))


def main(argv: list[str] | None = None) -> None:
    import multiprocessing
    import tempfile

    from runtime.config import EngineConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineConfig.add_cli_args(parser)
    parser.add_argument("--tick-ms", type=float, default=10.0, help="one token per active request per tick")
    args = parser.parse_args(argv)
    config = EngineConfig.from_cli(args)
    run_dir = tempfile.mkdtemp(prefix="moe-fake-")
    addrs = Addresses.ipc(run_dir, 1)
    # the fake runs in its own process, so the front end's numbers are its own
    proc = multiprocessing.get_context("spawn").Process(target=_run_fake, args=(addrs, args.tick_ms / 1e3), daemon=True)
    proc.start()
    from server.api_server import run_api_server

    try:
        run_api_server(config, addrs)
    finally:
        proc.terminate()


def _run_fake(addrs: Addresses, tick_s: float) -> None:
    engine = FakeEngine(addrs, tick_s)
    engine.run()


if __name__ == "__main__":
    main()
