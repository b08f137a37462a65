"""Control-plane pieces alone (no ranks): hang detection by progress, stats across a restart, the router,
the mixed-step budget, the front end's hang policy and coordinator-restart re-send, the control-plane watch."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import zmq

from runtime.cluster.coordinator import StepClock
from runtime.cluster.coordinator_stats import StatsAggregator
from runtime.cluster.rank_watch import RankWatch
from runtime.cluster.router import Router, prefix_hashes
from runtime.messages import (
    AddRequest,
    Addresses,
    ClusterStats,
    Heartbeat,
    OutputBatch,
    RankHung,
    RankStats,
    StepReport,
    TokenDelta,
    decode,
    encode,
)
from runtime.sampling_params import SamplingParams
from server.engine_client import EngineClient
from server.protocol import APIError


def beat(rank: int, progress: int, busy: bool = True, ids: tuple[str, ...] = (), pid: int = 0) -> Heartbeat:
    return Heartbeat(rank=rank, epoch=0, step_id=1, busy=busy, progress=progress, request_ids=list(ids), pid=pid,
                     hostname=RankWatch(1, 1.0).hostname)


def test_long_busy_step_is_not_a_hang_but_a_stall_is() -> None:
    watch = RankWatch(2, hang_timeout_s=10.0)
    t0 = time.monotonic()
    ready = [True, True]
    # rank 0 runs a 60 s prefill, its layer counter moving every second: never suspect, never killed
    for s in range(60):
        watch.beat(beat(0, s), now=t0 + s)
        watch.beat(beat(1, 0, busy=False), now=t0 + s)
        assert watch.check(t0 + s + 0.5, ready) == (False, None)
    assert not watch.any_suspect
    # then its progress stands still for longer than half the timeout: suspect (degraded), not yet killed
    for s in range(60, 66):
        watch.beat(beat(0, 59, ids=("r1",)), now=t0 + s)
        watch.beat(beat(1, 0, busy=False), now=t0 + s)
    changed, killed = watch.check(t0 + 66, ready)
    assert changed and watch.suspect == [True, False] and killed is None
    # moving again: healthy again
    assert watch.beat(beat(0, 60), now=t0 + 66.5) and not watch.any_suspect


def test_hung_rank_killed_once_with_the_requests_of_its_step() -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = RankWatch(2, hang_timeout_s=4.0)
        t0 = time.monotonic()
        watch.beat(beat(0, 5, ids=("a", "b"), pid=victim.pid), now=t0)  # stalled inside a step
        watch.beat(beat(1, 9, busy=False, pid=os.getpid()), now=t0)
        for s in range(1, 6):
            watch.beat(beat(0, 5, ids=("a", "b"), pid=victim.pid), now=t0 + s)
            watch.beat(beat(1, 9, busy=False, pid=os.getpid()), now=t0 + s)
        changed, killed = watch.check(t0 + 5.5, [True, True])
        assert killed is not None and killed.rank == 0 and killed.request_ids == ["a", "b"]
        assert "made no progress" in killed.reason
        assert victim.wait(5) == -signal.SIGKILL
        assert watch.check(t0 + 20, [True, True])[1] is None  # one kill per incarnation
    finally:
        if victim.poll() is None:
            victim.kill()


def test_silent_rank_is_blamed_before_its_stalled_peer() -> None:
    victims = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        watch = RankWatch(2, hang_timeout_s=4.0)
        t0 = time.monotonic()
        watch.beat(beat(0, 1, pid=victims[0].pid), now=t0)
        watch.beat(beat(1, 1, ids=("x",), pid=victims[1].pid), now=t0)
        for s in range(1, 8):  # rank 0 is stopped (silent); rank 1 waits for it in a collective (stalled)
            watch.beat(beat(1, 1, ids=("x",), pid=victims[1].pid), now=t0 + s)
        changed, killed = watch.check(t0 + 7.5, [True, True])
        assert changed and watch.suspect == [True, True]
        assert killed is not None and killed.rank == 0 and "silent" in killed.reason
        assert victims[0].wait(5) == -signal.SIGKILL and victims[1].poll() is None
    finally:
        for v in victims:
            if v.poll() is None:
                v.kill()
                v.wait(5)


def test_stats_after_a_restart_never_go_negative() -> None:
    agg = StatsAggregator(2)
    agg.latest = [RankStats(0, 1, 0, 0.1, 1000, 2000, 50, 0), RankStats(1, 1, 0, 0.1, 800, 1500, 50, 5)]
    agg.line(None, agg.last_time + 1.0)
    # the group restarted: the new incarnation's counters are small
    for r in range(2):
        agg.forget(r)
    agg.latest[0] = RankStats(0, 1, 0, 0.1, 30, 10, 3, 0)
    line = agg.line(None, agg.last_time + 1.0)
    assert "-" not in line.split("KV")[0], line
    assert "generation 10.0 tok/s [10.0/0.0]" in line
    # counters that went down without forget() (a launcher that keeps no epochs) count from 0 as well
    agg.latest[0] = RankStats(0, 1, 0, 0.1, 5, 4, 1, 0)
    assert "generation 4.0 tok/s" in agg.line(None, agg.last_time + 1.0)


def _idle(router: Router) -> None:
    """Every rank reports: nothing running, every request it was sent taken."""
    for r in range(router.num_ranks):
        router.update(StepReport(rank=r, step_id=0, num_tokens=0, is_decode=False,
                                 num_requests_received=router.num_routed[r]))


def test_router_follows_the_conversation_and_rotates_ties() -> None:
    system = list(range(1, 161))  # 10 blocks of 16 shared by every conversation
    router = Router(2, "prefix", block_size=16)
    turn1 = [system + [1000 + c] * 100 for c in range(40)]
    first = [router.pick(p) for p in turn1]
    # the system prompt draws them to rank 0 until the queues are clearly out of balance; from then on both
    # ranks hold it and the queues even out
    assert first[:17] == [0] * 17 and first.count(0) == first.count(1) == 20
    _idle(router)
    # second turns (prompt = first turn + answer + new question), in another order: each goes where its
    # first turn's KV is
    order = list(range(40))
    random.Random(1).shuffle(order)
    second = {c: router.pick(turn1[c] + [7] * 40) for c in order}
    assert all(second[c] == first[c] for c in range(40))
    assert router.matched_blocks(first[2], prefix_hashes(turn1[2] + [7] * 40, 16)) == (300 - 1) // 16
    # the old policy (load alone): the second turns land anywhere
    load_only = Router(2, "load", block_size=16)
    first = [load_only.pick(p) for p in turn1]
    _idle(load_only)
    second = {c: load_only.pick(turn1[c] + [7] * 40) for c in order}
    assert sum(second[c] == first[c] for c in range(40)) < 30
    # load alone: ties rotate, whatever is cached
    load_only = Router(2, "load", block_size=16)
    assert [load_only.pick(system) for _ in range(4)] == [0, 1, 0, 1]
    # an explicit rank wins
    assert router.pick(system, data_parallel_rank=1) == 1 and router.pick(system, data_parallel_rank=1) == 1
    # far out of balance: load beats the cache
    _idle(router)
    router.update(StepReport(rank=first[3], step_id=0, num_tokens=0, is_decode=False, num_running=200,
                             num_requests_received=router.num_routed[first[3]]))
    assert router.pick(turn1[3] + [7] * 40) == 1 - first[3]


def report(rank: int, step: int, n: int, decode_tokens: int = 0) -> StepReport:
    return StepReport(rank=rank, step_id=step, num_tokens=n, is_decode=False, num_decode_tokens=decode_tokens)


def test_clock_caps_the_next_step_while_someone_decodes_and_adopts_a_step_id() -> None:
    clock = StepClock(2, mixed_step_token_budget=64)
    clock.on_report(report(0, 0, 1000))
    cmds = clock.on_report(report(1, 0, 0))
    assert cmds is not None and [c.next_token_budget for c in cmds] == [0, 0]  # nobody decodes: no cap
    clock.on_report(report(0, 1, 1, decode_tokens=1))
    cmds = clock.on_report(report(1, 1, 0))
    assert cmds is not None and [c.next_token_budget for c in cmds] == [64, 64]
    # a restarted coordinator meets ranks at step 57: it takes that up instead of waiting forever
    fresh = StepClock(2)
    assert fresh.on_report(report(0, 57, 3)) is None
    cmds = fresh.on_report(report(1, 57, 0))
    assert cmds is not None and cmds[0].step_id == 57 and fresh.step_id == 58
    assert fresh.on_report(report(0, 99, 3)) is None  # once running, a foreign step id is ignored


def _front_end(scenario) -> None:  # noqa: ANN001
    async def run(addrs: Addresses, ctx: zmq.Context) -> None:
        coordinator = ctx.socket(zmq.PULL)
        coordinator.bind(addrs.to_coordinator)
        client = EngineClient(addrs, max_queue_len=8)
        await client.start()
        engines = ctx.socket(zmq.PUSH)
        engines.connect(addrs.to_frontend)

        async def send(msg: object) -> None:
            engines.send(encode(msg))
            for _ in range(30):
                await asyncio.sleep(0.01)

        def sent() -> list[AddRequest]:
            out = []
            while coordinator.poll(100):
                msg = decode(coordinator.recv())
                if isinstance(msg, AddRequest):
                    out.append(msg)
            return out

        try:
            await scenario(client, send, sent)
        finally:
            await client.close()
            engines.close(0)
            coordinator.close(0)

    with tempfile.TemporaryDirectory() as d:
        ctx = zmq.Context()
        try:
            asyncio.run(asyncio.wait_for(run(Addresses.ipc(d, 2), ctx), 30))
        finally:
            ctx.destroy(linger=0)


def test_front_end_retries_a_hung_request_once_then_fails_it() -> None:
    async def scenario(client: EngineClient, send, sent) -> None:  # noqa: ANN001
        params = SamplingParams(temperature=0.0, max_tokens=5)
        long_group = client.open([("long", [1] * 50, params)])
        other = client.open([("other", [2], params)])
        sent()
        await send(RankHung(rank=1, epoch=0, request_ids=["long"], reason="rank 1 made no progress for 6 s"))
        await send(ClusterStats(ranks=[], num_engine_restarts=1, epoch=1))
        assert sorted(r.request_id for r in sent()) == ["long", "other"]  # first hang: both re-submitted
        await send(RankHung(rank=1, epoch=1, request_ids=["long"], reason="rank 1 made no progress for 6 s"))
        await send(ClusterStats(ranks=[], num_engine_restarts=2, epoch=2))
        assert [r.request_id for r in sent()] == ["other"]  # the request that hung twice is not sent again
        with pytest.raises(APIError) as err:
            await long_group.next_batch()
        assert err.value.status_code == 500 and "hung, twice" in err.value.message
        assert "other" in client.in_flight and other.unfinished == {"other"}

    _front_end(scenario)


def test_front_end_resends_waiting_requests_to_a_restarted_coordinator() -> None:
    async def scenario(client: EngineClient, send, sent) -> None:  # noqa: ANN001
        params = SamplingParams(temperature=0.0, max_tokens=5)
        client.open([("streaming", [1, 2], params)])
        client.open([("queued", [3], params)], data_parallel_rank=1)
        sent()
        await send(ClusterStats(ranks=[], coordinator_id=11))
        await send(OutputBatch(0, [TokenDelta("streaming", [9])]))
        assert sent() == []
        await send(ClusterStats(ranks=[], coordinator_id=22))  # a new coordinator process
        again = sent()
        assert [(r.request_id, r.resend, r.data_parallel_rank) for r in again] == [("queued", True, 1)]
        with pytest.raises(APIError) as err:
            client.open([("bad", [3], params)], data_parallel_rank=2)
        assert err.value.status_code == 400 and "data_parallel_rank" in err.value.message

    _front_end(scenario)


def test_control_plane_watch_restarts_a_killed_process_but_not_a_stopped_one() -> None:
    from runtime.cluster.control_watch import ControlPlaneWatch

    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = [subprocess.Popen(cmd, start_new_session=True), subprocess.Popen(cmd, start_new_session=True)]
    watch = ControlPlaneWatch(procs, ["coordinator", "API server"], dict(os.environ), interval_s=0.05)
    watch.start()
    try:
        first = procs[0]
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while procs[0] is first:
            assert time.monotonic() < deadline, "the killed process was not restarted"
            time.sleep(0.05)
        assert procs[0].poll() is None
        second = procs[1]
        second.terminate()  # a deliberate stop
        second.wait(5)
        time.sleep(0.3)
        assert procs[1] is second
    finally:
        watch.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_scheduler_caps_prefill_chunks_while_sequences_decode() -> None:
    from runtime.engine.block_manager import BlockManager
    from runtime.engine.scheduler import Scheduler
    from runtime.engine.sequence import Sequence

    sch = Scheduler(BlockManager(num_blocks=256, block_size=4), max_num_seqs=8, max_num_batched_tokens=512)
    sch.mixed_step_token_budget = 32
    long = Sequence("long", list(range(3, 403)), SamplingParams(max_tokens=4))
    sch.add(long)
    assert sch.schedule().num_tokens == 400  # nobody decodes: the whole prompt in one step
    sch.finish(long, "abort")
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=99))
    sch.add(a)
    sch.schedule()
    a.num_computed_tokens = 3
    a.token_ids.append(5)  # a decodes now
    long = Sequence("long2", list(range(3, 403)), SamplingParams(max_tokens=4))
    sch.add(long)
    batch = sch.schedule()
    assert batch.seqs == [a, long] and batch.num_new_tokens == [1, 31]  # a's token, then a 31-token chunk
    sch.step_token_budget = 16  # the coordinator's cap under lockstep is the tighter one here
    long.num_computed_tokens += 31
    a.num_computed_tokens += 1
    a.token_ids.append(6)
    assert sch.schedule().num_tokens == 16


def test_lockstep_rank_waiting_for_a_peer_is_not_stalled_and_the_big_step_is_blamed() -> None:
    victims = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        watch = RankWatch(2, hang_timeout_s=4.0, lockstep=True)
        t0 = time.monotonic()

        def beats(s: float, progress1: int) -> None:
            # rank 0 decodes (1 token) and waits in the all2all; rank 1 prefills 8000 tokens
            watch.beat(Heartbeat(rank=0, epoch=0, step_id=3, busy=True, progress=10, request_ids=["d"],
                                 pid=victims[0].pid, hostname=watch.hostname, num_tokens=1), now=t0 + s)
            watch.beat(Heartbeat(rank=1, epoch=0, step_id=3, busy=True, progress=progress1, request_ids=["p"],
                                 pid=victims[1].pid, hostname=watch.hostname, num_tokens=8000), now=t0 + s)

        for s in range(12):  # rank 1's layers move; rank 0 stands still for 12 s, three times the timeout
            beats(s, 10 + s)
            assert watch.check(t0 + s + 0.5, [True, True]) == (False, None), s
        for s in range(12, 18):  # then nobody moves
            beats(s, 21)
        changed, killed = watch.check(t0 + 17.5, [True, True])
        assert changed and killed is not None and killed.rank == 1 and killed.request_ids == ["p"]
        assert victims[1].wait(5) == -signal.SIGKILL and victims[0].poll() is None
    finally:
        for v in victims:
            if v.poll() is None:
                v.kill()
                v.wait(5)


def test_a_peer_stalled_by_a_silent_rank_is_not_killed_first() -> None:
    victims = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        watch = RankWatch(2, hang_timeout_s=4.0, lockstep=True)
        t0 = time.monotonic()

        def hb(rank: int, ids: list[str]) -> Heartbeat:
            return Heartbeat(rank=rank, epoch=0, step_id=1, busy=True, progress=5, request_ids=ids,
                             pid=victims[rank].pid, hostname=watch.hostname)

        # rank 1 is stopped right after a heartbeat at t0 + 0.9; rank 0 waits for it in a collective from t0
        watch.beat(hb(0, ["a"]), now=t0)
        watch.beat(hb(1, ["b"]), now=t0 + 0.9)
        for s in range(1, 5):
            watch.beat(hb(0, ["a"]), now=t0 + s)
        assert watch.check(t0 + 4.5, [True, True])[1] is None  # rank 0 stalled 4.5 s, but rank 1 is silent
        killed = watch.check(t0 + 5.0, [True, True])[1]  # rank 1 silent 4.1 s: it is the one
        assert killed is not None and killed.rank == 1 and killed.request_ids == ["b"]
        assert victims[1].wait(5) == -signal.SIGKILL and victims[0].poll() is None
    finally:
        for v in victims:
            if v.poll() is None:
                v.kill()
                v.wait(5)
