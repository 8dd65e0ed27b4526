"""The engine with fake tasks: batching, cancellation, failures, admission, watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.engine import Engine, Outcome, Partial, Warming
from core.errors import (
    EngineDead,
    InferenceFailed,
    InvalidRequest,
    ModelUnavailable,
    Overloaded,
    TaskUnavailable,
)
from core.executor import _cgroup_quota, usable_cores
from core.settings import BatchSettings, EngineSettings
from tests.backends import engine_on
from tests.fakes import CountingTask, EchoTask, FakeDevice, HungryTask, Item, TightTask


def settings(tmp_path: Path, **overrides: object) -> EngineSettings:
    values: dict[str, object] = {
        "device": "cpu",
        "model_cache": tmp_path,
        "forward_timeout_s": 10.0,
    }
    values.update(overrides)
    return EngineSettings(**values)  # type: ignore[arg-type]


async def test_concurrent_requests_share_batches(tmp_path: Path) -> None:
    task = EchoTask()
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        results = await asyncio.gather(*(engine.run("echo", f"w{i}") for i in range(8)))
    assert [r.value for r in results] == [f"W{i}" for i in range(8)]
    assert sorted(len(b) for b in task.batches) == [4, 4]


async def test_a_batch_waits_for_items_still_being_prepared(tmp_path: Path) -> None:
    """Eight requests at once, each taking 30 ms to prepare on two CPU threads: they reach
    the batcher over about 120 ms, past the 50 ms a batch waits. Running the first batch
    short would give the rest a second forward moments later."""

    class SlowToPrepare(EchoTask):
        def preprocess(self, request: str) -> Item:
            time.sleep(0.03)
            return super().preprocess(request)

    task = SlowToPrepare(batching=BatchSettings(batch_size=8, max_wait_ms=50))
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("echo")
        task.batches.clear()  # the warm-up's
        await asyncio.gather(*(engine.run("echo", f"w{i}") for i in range(8)))
    assert [len(b) for b in task.batches] == [8]


async def test_a_short_batch_does_not_wait_for_ever_on_slow_preparation(tmp_path: Path) -> None:
    gate = threading.Event()

    class StuckPreparing(EchoTask):
        def preprocess(self, request: str) -> Item:
            if request == "stuck":
                gate.wait(10)
            return super().preprocess(request)

    task = StuckPreparing(batching=BatchSettings(batch_size=4, max_wait_ms=20))
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("echo")
        stuck = asyncio.create_task(engine.run("echo", "stuck"))
        started = time.monotonic()
        assert (await engine.run("echo", "quick")).value == "QUICK"
        # Its 20 ms wait and the grace for items being prepared, not the stuck one's.
        assert time.monotonic() - started < 1.0
        gate.set()
        assert (await stuck).value == "STUCK"


async def test_items_with_different_keys_never_share_a_forward(tmp_path: Path) -> None:
    task = EchoTask()
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        await asyncio.gather(*(engine.run("echo", f"{'ab'[i % 2]}:v{i}") for i in range(6)))
    for batch in task.batches:
        assert len({int(v[1:]) % 2 for v in batch}) == 1, batch
    assert sorted(len(b) for b in task.batches) == [3, 3]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
async def test_phases_run_on_their_threads(tmp_path: Path, device: str) -> None:
    task = EchoTask()
    async with Engine({"echo": task}, settings(tmp_path, device=device)) as engine:
        await engine.run("echo", "x")
    # On a CPU a load is long work, on the lane where long forwards run; a forward that
    # measured short runs beside them.
    loads = "captionbot-device-long" if device == "cpu" else "captionbot-device"
    assert task.threads["load"] == {loads}
    assert task.threads["forward"] == {loads, "captionbot-device"}
    assert all(name.startswith("captionbot-cpu") for name in task.threads["preprocess"])
    assert all(name.startswith("captionbot-cpu") for name in task.threads["postprocess"])
    assert task.threads["unload"] == {"captionbot-device"}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
async def test_only_the_long_forwards_thread_gets_every_core(tmp_path: Path, device: str) -> None:
    """One large math team per process (see ``CpuLanes``): every thread the engine owns
    pins its threads first, and only the one running long forwards gets every core."""
    pinned: dict[str, int] = {}

    def pin_threads(count: int) -> None:
        pinned[threading.current_thread().name] = count

    long_task = EchoTask(name="ocr", cost=lambda n: 0.6)
    short_task = EchoTask(name="caption")
    tasks = {"ocr": long_task, "caption": short_task}
    async with Engine(
        tasks,  # type: ignore[arg-type]
        settings(tmp_path, device=device),
        pin_threads=pin_threads,
    ) as engine:
        await asyncio.gather(engine.run("ocr", "a"), engine.run("caption", "b"))
    cores = usable_cores()
    if device == "cpu":
        # The long task's very first forward already goes to its lane: the warm-up at
        # load time (on that lane, as every load) measured it.
        assert long_task.threads["forward"] == {"captionbot-device-long"}
        assert "captionbot-device" in short_task.threads["forward"]
        lanes = {"captionbot-device": 1, "captionbot-device-long": cores}
    else:
        lanes = {"captionbot-device": cores}
    pool = {name: count for name, count in pinned.items() if name.startswith("captionbot-cpu")}
    assert pool and set(pool.values()) == {1}
    assert {name: count for name, count in pinned.items() if name not in pool} == lanes


async def test_a_caller_who_leaves_is_reported_to_a_task_that_can_recall(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    task = EchoTask(gate=gate, batching=BatchSettings(batch_size=2, max_wait_ms=1))
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("echo")
        leaving = asyncio.create_task(engine.run("echo", "leaving"))
        staying = asyncio.create_task(engine.run("echo", "staying"))
        await asyncio.sleep(0.1)  # handed to the forward, which waits at the gate
        leaving.cancel()
        await asyncio.sleep(0.05)
        assert task.abandoned == ["leaving"]
        gate.set()
        assert (await staying).value == "STAYING"
    assert task.abandoned == ["leaving"]


# -- on both backends: what the engine promises its callers, wherever the models run ------


async def test_cancelled_callers_are_dropped_before_the_forward(
    tmp_path: Path, backend: str
) -> None:
    log = tmp_path / "forwards.log"
    slow_first = functools.partial(
        EchoTask,
        batching=BatchSettings(batch_size=2, max_wait_ms=1),
        slow_on="first",
        slow_s=1.5,
        log_to=str(log),
    )
    async with engine_on(backend, {"echo": slow_first}, model_cache=tmp_path) as engine:
        await engine.ensure_loaded("echo")
        log.write_text("")
        first = asyncio.create_task(engine.run("echo", "first"))
        await asyncio.sleep(0.5)  # "first" is in its forward; the next two wait in line
        doomed = asyncio.create_task(engine.run("echo", "doomed"))
        kept = asyncio.create_task(engine.run("echo", "kept"))
        await asyncio.sleep(0.1)
        doomed.cancel()
        assert (await first).value == "FIRST"
        assert (await kept).value == "KEPT"
    with pytest.raises(asyncio.CancelledError):
        await doomed
    finished = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(finished) == ["first", "kept"]


async def test_a_failing_batch_fails_only_its_callers(tmp_path: Path, backend: str) -> None:
    # Four at once fill one batch: locally, a forward per key; on Ray, one batch of the
    # replica's, which runs a forward per key.
    failing = functools.partial(
        EchoTask, fail_on="boom", batching=BatchSettings(batch_size=4, max_wait_ms=500)
    )
    async with engine_on(backend, {"echo": failing}, model_cache=tmp_path) as engine:
        await engine.ensure_loaded("echo")
        results = await asyncio.gather(
            engine.run("echo", "a:boom"),
            engine.run("echo", "a:victim"),
            engine.run("echo", "b:fine"),
            engine.run("echo", "b:also"),
            return_exceptions=True,
        )
        assert isinstance(results[0], InferenceFailed)
        assert isinstance(results[1], InferenceFailed)  # its key's forward failed
        assert "echo" in str(results[0]) and "simulated" not in str(results[0])
        assert [r.value for r in results[2:]] == ["FINE", "ALSO"]  # type: ignore[union-attr]
        # The engine keeps working afterwards.
        assert (await engine.run("echo", "again")).value == "AGAIN"


async def test_wrong_number_of_outputs_is_an_inference_failure(
    tmp_path: Path, backend: str
) -> None:
    miscounting = functools.partial(
        EchoTask, wrong_count=True, batching=BatchSettings(batch_size=1)
    )
    # Warm-up checks the count too, so the task fails to load with a clear error.
    async with engine_on(backend, {"echo": miscounting}, model_cache=tmp_path) as engine:
        with pytest.raises(
            TaskUnavailable, match=r"could not be loaded|could not start on the Ray cluster"
        ):
            await engine.run("echo", "x")


async def test_invalid_requests_are_rejected_on_the_loop(tmp_path: Path, backend: str) -> None:
    async with engine_on(backend, {"echo": EchoTask}, model_cache=tmp_path) as engine:
        with pytest.raises(InvalidRequest, match="empty"):
            await engine.run("echo", "")
        with pytest.raises(TaskUnavailable, match="'nope'"):
            await engine.run("nope", "x")
        # Nothing reached the device: the model was not even loaded (or deployed).
        assert not engine.stats().tasks[0].loaded


async def test_overload_answers_at_once_with_an_estimate(tmp_path: Path, backend: str) -> None:
    slow = functools.partial(
        EchoTask, batching=BatchSettings(batch_size=1, max_wait_ms=1), slow_on="r0", slow_s=3.0
    )
    async with engine_on(backend, {"echo": slow}, model_cache=tmp_path, max_in_flight=2) as engine:
        await engine.ensure_loaded("echo")
        running = [asyncio.create_task(engine.run("echo", f"r{i}")) for i in range(2)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(Overloaded) as raised:
            await engine.run("echo", "extra")
        assert time.monotonic() - started < 0.05
        assert raised.value.retry_after_s >= 1
        assert "try again" in str(raised.value)
        stats = engine.stats()
        assert stats.in_flight == 2
        assert stats.tasks[0].queued == 2
        assert stats.tasks[0].eta_s > 0
        assert [r.value for r in await asyncio.gather(*running)] == ["R0", "R1"]


async def test_waiting_for_room_is_first_come_first_served(tmp_path: Path) -> None:
    async with Engine({"echo": EchoTask()}, settings(tmp_path, max_in_flight=4)) as engine:
        held = engine.reserve(3)
        places: dict[str, list[int]] = {"first": [], "second": [], "third": []}

        def tell(name: str) -> Callable[[int, float], None]:
            return lambda ahead, eta_s: places[name].append(ahead)

        first = asyncio.create_task(engine.wait_for_room(3, tell("first")))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(engine.wait_for_room(1, tell("second")))
        third = asyncio.create_task(engine.wait_for_room(2, tell("third")))
        await asyncio.sleep(0.01)
        # One slot is free, but the line goes first: no one jumps it.
        with pytest.raises(Overloaded):
            engine.reserve(1)
        assert places == {"first": [0], "second": [1], "third": [2]}

        second.cancel()  # leaves the line
        await asyncio.sleep(0.01)
        held.release()
        granted = await asyncio.wait_for(first, 5)
        assert granted.slots == 3 and engine.stats().in_flight == 3
        await asyncio.sleep(0.01)
        assert not third.done()  # one slot free, two wanted
        granted.release()
        assert (await asyncio.wait_for(third, 5)).slots == 2
        assert places["third"] in ([2], [2, 0])  # told again only if it looked meanwhile
        assert engine.stats().in_flight == 2


async def test_a_hung_forward_kills_the_engine_for_everyone(tmp_path: Path) -> None:
    task = EchoTask(cost=lambda n: 3.0, batching=BatchSettings(batch_size=1, max_wait_ms=1))
    engine = Engine({"echo": task}, settings(tmp_path, forward_timeout_s=0.3))
    await engine.start()
    task.cost = lambda n: 0.0
    await engine.ensure_loaded("echo")
    task.cost = lambda n: 3.0
    hung = asyncio.create_task(engine.run("echo", "hang"))
    queued = asyncio.create_task(engine.run("echo", "queued"))
    with pytest.raises(EngineDead):
        await hung
    with pytest.raises(EngineDead):
        await queued
    with pytest.raises(EngineDead):
        await engine.run("echo", "later")
    assert engine.stats().dead
    await engine.aclose()


async def test_the_loop_stays_responsive_while_the_device_works(tmp_path: Path) -> None:
    task = EchoTask(cost=lambda n: 0.5, batching=BatchSettings(batch_size=1))
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("echo")
        work = asyncio.gather(*(engine.run("echo", f"x{i}") for i in range(3)))
        worst = 0.0
        while not work.done():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            worst = max(worst, time.perf_counter() - before - 0.01)
        await work
    assert worst < 0.05


async def test_the_loop_stays_responsive_while_torch_computes(tmp_path: Path) -> None:
    import torch

    def matmuls(n: int) -> float:
        # Real CPU work on the device thread, which takes and releases the GIL per op.
        a = torch.randn(256, 256)
        for _ in range(400):
            a = torch.tanh(a @ a)
        return 0.0

    task = EchoTask(cost=matmuls, batching=BatchSettings(batch_size=1))
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("echo")
        work = asyncio.gather(*(engine.run("echo", f"x{i}") for i in range(3)))
        lags: list[float] = []
        while not work.done():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)
        await work
    assert len(lags) > 5  # the work took long enough to measure anything
    assert sorted(lags)[int(len(lags) * 0.99) - 1] < 0.05


async def test_short_tasks_jump_ahead_of_long_ones(tmp_path: Path) -> None:
    gate = threading.Event()
    order: list[str] = []
    slow = EchoTask(
        name="slow", priority=5, gate=gate, batching=BatchSettings(batch_size=1, max_wait_ms=1)
    )
    fast = EchoTask(name="fast", priority=0, batching=BatchSettings(batch_size=1, max_wait_ms=1))
    async with Engine({"slow": slow, "fast": fast}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("slow")
        await engine.ensure_loaded("fast")

        async def run(name: str, text: str) -> None:
            await engine.run(name, text)
            order.append(text)

        blocker = asyncio.create_task(run("slow", "blocker"))
        await asyncio.sleep(0.05)
        later_slow = asyncio.create_task(run("slow", "slow2"))
        await asyncio.sleep(0.05)
        later_fast = asyncio.create_task(run("fast", "fast1"))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, later_slow, later_fast)
    assert order == ["blocker", "fast1", "slow2"]


@pytest.mark.parametrize("quick", ["caption", "ocr"])
async def test_among_equal_priorities_the_measured_shorter_forward_goes_first(
    tmp_path: Path, quick: str
) -> None:
    """On a CPU a caption is the short forward and OCR the long one; on a GPU it can be the
    other way round: the order comes from what each task's forwards measured here."""
    one_at_a_time = BatchSettings(batch_size=1, max_wait_ms=1)
    gate = threading.Event()
    tasks = {
        name: EchoTask(name=name, priority=0, batching=one_at_a_time)
        for name in ("caption", "ocr", "busy")
    }
    slow = "ocr" if quick == "caption" else "caption"
    tasks[slow].cost = lambda n: 0.1
    order: list[str] = []
    async with Engine(tasks, settings(tmp_path)) as engine:  # type: ignore[arg-type]
        for name in tasks:
            await engine.run(name, "measured")  # each forward's time, as the engine sees it
        tasks["busy"].gate = gate  # from now on its forward holds the device until opened

        async def run(name: str, text: str) -> None:
            await engine.run(name, text)
            order.append(text)

        busy = asyncio.create_task(run("busy", "busy"))
        await asyncio.sleep(0.05)
        long_one = asyncio.create_task(run(slow, "long"))  # asked first
        await asyncio.sleep(0.05)
        short_one = asyncio.create_task(run(quick, "short"))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(busy, long_one, short_one)
    assert order == ["busy", "short", "long"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
async def test_a_short_forward_waits_for_a_long_one_only_on_a_gpu(
    tmp_path: Path, device: str
) -> None:
    """On a CPU a caption does not wait out an OCR forward of seconds: forwards that measured
    long run on a lane of their own. On a GPU one thread owns the device, so it waits."""
    one_at_a_time = BatchSettings(batch_size=1, max_wait_ms=1)
    gate = threading.Event()
    long_task = EchoTask(name="ocr", priority=0, batching=one_at_a_time, cost=lambda n: 0.6)
    short_task = EchoTask(name="caption", priority=0, batching=one_at_a_time)
    tasks = {"ocr": long_task, "caption": short_task}
    async with Engine(tasks, settings(tmp_path, device=device)) as engine:  # type: ignore[arg-type]
        for name in tasks:
            await engine.run(name, "measured")
        long_task.gate = gate
        held = asyncio.create_task(engine.run("ocr", "held"))
        await asyncio.sleep(0.1)
        short = asyncio.create_task(engine.run("caption", "short"))
        await asyncio.wait([short], timeout=2)
        assert short.done() is (device == "cpu")
        assert not held.done()
        gate.set()
        assert (await short).value == "SHORT"
        assert (await held).value == "HELD"


async def test_batch_size_is_measured_when_not_configured(tmp_path: Path) -> None:
    # A fixed cost per forward plus a small cost per item: batching pays off.
    amortised = EchoTask(
        name="amortised",
        cost=lambda n: 0.04 + 0.002 * n,
        batching=BatchSettings(batch_size=None, max_batch_size=8),
    )
    # Cost strictly proportional to items: batching only adds latency. (Long enough per
    # item that the forward's own overhead, spread over a batch, stays under _NEAR_BEST.)
    linear = EchoTask(
        name="linear",
        cost=lambda n: 0.1 * n,
        batching=BatchSettings(batch_size=None, max_batch_size=4),
    )
    async with Engine({"amortised": amortised, "linear": linear}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("amortised")
        await engine.ensure_loaded("linear")
        assert engine.batch_size("amortised") == 8
        assert engine.batch_size("linear") == 1


@pytest.mark.parametrize(
    "per_batch",
    [
        # No gain at 2 or 4 items, then a large one at 8 (as fp32 BLIP on a CPU behaves).
        {1: 0.02, 2: 0.04, 4: 0.08, 8: 0.08},
        # 4% less time per item at 8 than at 4, as fp32 BLIP on this machine can measure.
        {1: 0.05, 2: 0.1, 4: 0.2, 8: 0.384},
    ],
    ids=["past a flat step", "a small but real gain"],
)
async def test_batch_measurement_finds_the_gain_at_the_largest_size(
    tmp_path: Path, per_batch: dict[int, float]
) -> None:
    task = EchoTask(
        cost=per_batch.__getitem__, batching=BatchSettings(batch_size=None, max_batch_size=8)
    )
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("echo")
        assert engine.batch_size("echo") == 8


async def test_one_slow_run_does_not_end_the_batch_search(tmp_path: Path) -> None:
    """A size's first forward may pay for its new shapes; the search runs it again."""
    costs = {1: [0.02], 2: [0.08, 0.02], 4: [0.03], 8: [0.04]}

    def cost(n: int) -> float:
        runs = costs[n]
        return runs.pop(0) if len(runs) > 1 else runs[0]

    task = EchoTask(cost=cost, batching=BatchSettings(batch_size=None, max_batch_size=8))
    async with Engine({"echo": task}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("echo")
        assert engine.batch_size("echo") == 8


async def test_a_model_that_fails_to_load_is_unavailable_not_fatal(
    tmp_path: Path, backend: str
) -> None:
    broken = functools.partial(
        EchoTask, name="broken", load_error=OSError("no such folder /secret/path")
    )
    fine = functools.partial(EchoTask, name="fine")
    factories = {"broken": broken, "fine": fine}
    async with engine_on(backend, factories, model_cache=tmp_path) as engine:
        with pytest.raises(TaskUnavailable) as raised:
            await engine.run("broken", "x")
        assert "/secret" not in str(raised.value)
        assert (await engine.run("fine", "ok")).value == "OK"


async def test_preload_loads_every_task_at_start(tmp_path: Path) -> None:
    task = EchoTask()
    async with Engine({"echo": task}, settings(tmp_path, preload=True)) as engine:
        assert task.loads == 1
        assert engine.stats().tasks[0].loaded
    assert task.unloads == 1


# -- residency ---------------------------------------------------------------------------


async def test_a_memory_budget_unloads_the_least_recently_used_model(tmp_path: Path) -> None:
    tasks = {name: EchoTask(name=name, size_mb=40) for name in "abc"}
    budget = settings(tmp_path, memory_budget_mb=100)
    peaks: list[float] = []
    async with Engine(tasks, budget) as engine:  # type: ignore[arg-type]
        for name in ["a", "b", "c", "a", "c", "b"]:
            assert (await engine.run(name, f"x{name}")).value == f"X{name.upper()}"
            peaks.append(sum(t.memory_bytes() for t in tasks.values()) / 2**20)
        stats = engine.stats()
    assert max(peaks) <= 100
    # a, b loaded; c evicts a (least recent); a evicts b; c is fresh; b evicts a.
    assert [tasks[n].loads for n in "abc"] == [2, 2, 1]
    assert stats.resident_mb <= 100
    assert {t.name: t.memory_mb for t in stats.tasks}["c"] == 40


async def test_pinned_models_stay_resident(tmp_path: Path) -> None:
    tasks = {name: EchoTask(name=name, size_mb=40) for name in "abc"}
    pinned = settings(tmp_path, memory_budget_mb=100, pinned=("a",))
    async with Engine(tasks, pinned) as engine:  # type: ignore[arg-type]
        for name in ["a", "b", "c", "b", "c"]:
            await engine.run(name, "x")
        assert tasks["a"].loads == 1 and tasks["a"].resident
        assert tasks["b"].loads == 2 and tasks["c"].loads == 2


async def test_a_model_larger_than_the_budget_is_refused_not_crashed(tmp_path: Path) -> None:
    big = EchoTask(name="big", size_mb=150)
    small = EchoTask(name="small", size_mb=10)
    async with Engine(
        {"big": big, "small": small}, settings(tmp_path, memory_budget_mb=100)
    ) as engine:
        with pytest.raises(TaskUnavailable, match="needs 150 MB, more than the 100 MB"):
            await engine.run("big", "x")
        assert not big.resident
        assert (await engine.run("small", "ok")).value == "OK"


async def test_concurrent_tasks_under_a_tight_budget_all_succeed(tmp_path: Path) -> None:
    tasks = {name: EchoTask(name=name, size_mb=60, cost=lambda n: 0.01) for name in "abc"}
    async with Engine(tasks, settings(tmp_path, memory_budget_mb=100)) as engine:  # type: ignore[arg-type]
        results = await asyncio.gather(
            *(engine.run(name, f"{name}{i}") for i in range(4) for name in "abc")
        )
    assert sorted(r.value for r in results) == sorted(
        f"{n.upper()}{i}" for i in range(4) for n in "abc"
    )


# -- streaming ---------------------------------------------------------------------------


async def test_stream_reports_warming_then_partials_then_the_outcome(
    tmp_path: Path, backend: str
) -> None:
    # Long enough for Ray's partials, which a replica hands out every 0.1 s.
    counting = functools.partial(CountingTask, steps=10, step_s=0.06)
    events: list[object] = []
    async with engine_on(backend, {"count": counting}, model_cache=tmp_path) as engine:
        async for event in engine.stream("count", "job"):
            events.append(event)
    assert isinstance(events[0], Warming) and events[0].task == "count"
    partials = [e.value for e in events if isinstance(e, Partial)]
    assert len(partials) >= 3
    assert partials == sorted(partials, key=lambda text: int(text.split()[1]))
    assert isinstance(events[-1], Outcome) and events[-1].value == "job:10"


async def test_a_slow_reader_gets_the_newest_partial_not_a_backlog(tmp_path: Path) -> None:
    task = CountingTask(steps=30, step_s=0.01)
    seen: list[str] = []
    async with Engine({"count": task}, settings(tmp_path)) as engine:
        async for event in engine.stream("count", "job"):
            if isinstance(event, Partial):
                seen.append(event.value)
                await asyncio.sleep(0.08)
    assert len(seen) < 15
    assert seen[-1] == "step 30 of 30"


async def test_leaving_a_stream_stops_the_work(tmp_path: Path) -> None:
    task = CountingTask(steps=200, step_s=0.01)
    async with Engine({"count": task}, settings(tmp_path)) as engine:
        await engine.ensure_loaded("count")
        async with contextlib.aclosing(engine.stream("count", "job")) as events:
            async for event in events:
                if isinstance(event, Partial):
                    break
        for _ in range(100):
            if task.steps_run:
                break
            await asyncio.sleep(0.02)
        assert engine.stats().in_flight == 0
    assert task.steps_run and task.steps_run[-1] < 100


async def test_no_room_beside_pinned_models_is_a_clear_error(tmp_path: Path) -> None:
    tasks = {"a": EchoTask(name="a", size_mb=70), "b": EchoTask(name="b", size_mb=40)}
    pinned = settings(tmp_path, memory_budget_mb=100, pinned=("a",))
    async with Engine(tasks, pinned) as engine:  # type: ignore[arg-type]
        await engine.run("a", "x")
        for attempt in ("first load measures b", "the second is refused before loading"):
            with pytest.raises(TaskUnavailable, match="pinned"):
                await engine.run("b", attempt)
            assert not tasks["b"].resident
        assert tasks["b"].loads == 1
        assert (await engine.run("a", "still fine")).value == "STILL FINE"


async def test_load_times_survive_a_restart_for_the_warming_estimate(tmp_path: Path) -> None:
    first = CountingTask(steps=2)
    async with Engine({"count": first}, settings(tmp_path)) as engine:
        events = [event async for event in engine.stream("count", "one")]
    assert events[0] == Warming("count", None)  # never loaded before: no estimate
    again = CountingTask(steps=2)
    async with Engine({"count": again}, settings(tmp_path)) as engine:
        events = [event async for event in engine.stream("count", "two")]
    warming = events[0]
    assert isinstance(warming, Warming) and warming.eta_s is not None and warming.eta_s >= 0


async def test_a_damaged_load_time_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "load-times.json").write_text("{not json")
    async with Engine({"echo": EchoTask()}, settings(tmp_path)) as engine:
        assert (await engine.run("echo", "x")).value == "X"


async def test_a_bug_in_preprocessing_is_a_clean_failure(tmp_path: Path, backend: str) -> None:
    async with engine_on(backend, {"echo": EchoTask}, model_cache=tmp_path) as engine:
        with pytest.raises(InferenceFailed) as raised:
            await engine.run("echo", "crash")
        assert "/secret" not in str(raised.value) and "echo" in str(raised.value)
        assert (await engine.run("echo", "fine")).value == "FINE"


async def test_closing_the_engine_mid_forward_answers_every_caller(
    tmp_path: Path, backend: str
) -> None:
    busy = functools.partial(
        EchoTask, batching=BatchSettings(batch_size=1, max_wait_ms=1), slow_on="busy", slow_s=0.5
    )
    async with engine_on(backend, {"echo": busy}, model_cache=tmp_path) as engine:
        await engine.ensure_loaded("echo")
        running = asyncio.create_task(engine.run("echo", "busy"))
        queued = asyncio.create_task(engine.run("echo", "queued"))
        await asyncio.sleep(0.2)
        await engine.aclose()
        for caller in (running, queued):
            outcome = await asyncio.wait_for(asyncio.gather(caller, return_exceptions=True), 5)
            assert isinstance(outcome[0], EngineDead) or outcome[0].value in {"BUSY", "QUEUED"}  # type: ignore[union-attr]
        with pytest.raises(EngineDead):
            await engine.run("echo", "after close")


async def test_a_dead_engine_calls_back_so_the_process_can_exit(tmp_path: Path) -> None:
    reasons: list[str] = []
    task = EchoTask(cost=lambda n: 2.0, batching=BatchSettings(batch_size=1, max_wait_ms=1))
    engine = Engine(
        {"echo": task}, settings(tmp_path, forward_timeout_s=0.3), on_dead=reasons.append
    )
    await engine.start()
    task.cost = lambda n: 0.0
    await engine.ensure_loaded("echo")
    task.cost = lambda n: 2.0
    with pytest.raises(EngineDead):
        await engine.run("echo", "hang")
    assert reasons and "echo forward" in reasons[0]
    await engine.aclose()


class SlowLoad(EchoTask):
    """Loads only once ``opened`` is set, so a test can look while a load is under way."""

    opened: threading.Event

    def load(self) -> None:
        self.opened.wait(10)
        super().load()


async def test_warming_up_estimates_count_the_loads_the_device_does_first(
    tmp_path: Path,
) -> None:
    """A cold caption waits behind the OCR load too: say so, or the estimate runs out."""
    gate = threading.Event()
    first, second = SlowLoad(name="first"), EchoTask(name="second")
    first.opened = gate
    times = {f"first: {first.identity()}": 8.0, f"second: {second.identity()}": 3.0}
    (tmp_path / "load-times.json").write_text(json.dumps(times))
    tasks = {"first": first, "second": second}
    async with Engine(tasks, settings(tmp_path)) as engine:  # type: ignore[arg-type]

        def ready_in() -> dict[str, float | None]:
            return {t.name: t.ready_in_s for t in engine.stats().tasks}

        assert ready_in() == {"first": 8.0, "second": 3.0}
        loading = asyncio.ensure_future(engine.ensure_loaded("first"))
        await asyncio.sleep(0.05)
        assert ready_in() == {"first": 8.0, "second": 11.0}  # it would load after "first"
        gate.set()
        await loading
        assert ready_in() == {"first": None, "second": 3.0}  # loaded: nothing to wait for


async def test_no_estimate_before_a_model_was_ever_loaded_here(tmp_path: Path) -> None:
    async with Engine({"echo": EchoTask()}, settings(tmp_path)) as engine:
        [stats] = engine.stats().tasks
        assert stats.ready_in_s is None
        events = engine.stream("echo", "hello")
        assert await anext(events) == Warming("echo", None)
        await events.aclose()


# -- a first run on a GPU: failures remembered, memory made, downloads outside the watchdog --


class Unloadable(EchoTask):
    """A model whose files cannot be had: ``fetch`` fails with ``failure`` and counts."""

    failure: ModelUnavailable
    fetches: int

    def fetch(self) -> None:
        self.fetches += 1
        raise self.failure


async def test_a_load_that_will_not_work_by_itself_is_remembered_and_told_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gated model: the hub is not asked again on every request, the operator reads the
    cause and the fix once, and each user gets the one sentence."""
    task = Unloadable(name="write")
    task.fetches = 0
    task.failure = ModelUnavailable(
        "This bot cannot write social captions right now.", "gated: accept the license", None
    )
    async with Engine({"write": task}, settings(tmp_path)) as engine:
        with caplog.at_level(logging.ERROR, logger="core.engine"):
            for _ in range(3):
                with pytest.raises(ModelUnavailable, match="cannot write social captions"):
                    await engine.run("write", "hello")
    assert task.fetches == 1
    told = [r.getMessage() for r in caplog.records if "is unavailable" in r.getMessage()]
    assert told == [
        "write is unavailable: gated: accept the license (nothing is tried again until a restart)"
    ]
    assert not any(r.exc_info for r in caplog.records)


async def test_a_failure_that_may_pass_is_tried_again_after_its_wait(tmp_path: Path) -> None:
    task = Unloadable(name="write")
    task.fetches = 0
    task.failure = ModelUnavailable("Not now.", "the hub did not answer", retry_after_s=0.2)
    async with Engine({"write": task}, settings(tmp_path)) as engine:
        for _ in range(2):
            with pytest.raises(ModelUnavailable):
                await engine.run("write", "hello")
        assert task.fetches == 1
        await asyncio.sleep(0.3)
        with pytest.raises(ModelUnavailable):
            await engine.run("write", "hello")
        assert task.fetches == 2


async def test_a_load_failing_while_others_hold_memory_makes_room_and_tries_again(
    tmp_path: Path,
) -> None:
    """bitsandbytes' out-of-memory reaches us as a RuntimeError: with other models
    resident, the engine unloads them and tries once more (no memory budget set)."""
    device = FakeDevice(capacity_mb=100)
    big = HungryTask(name="big", size_mb=80, device=device)
    quantized = HungryTask(name="quantized", size_mb=50, device=device)
    tasks = {"big": big, "quantized": quantized}
    async with Engine(tasks, settings(tmp_path)) as engine:  # type: ignore[arg-type]
        assert (await engine.run("big", "x")).value == "X"
        assert (await engine.run("quantized", "y")).value == "Y"
        loaded = {t.name: t.loaded for t in engine.stats().tasks}
    assert loaded == {"big": False, "quantized": True}
    assert device.used_mb == 0  # both unloaded at close


async def test_a_load_that_fails_alone_is_not_retried_forever(tmp_path: Path) -> None:
    device = FakeDevice(capacity_mb=10)
    too_big = HungryTask(name="too_big", size_mb=50, device=device)
    async with Engine({"too_big": too_big}, settings(tmp_path)) as engine:
        for _ in range(2):
            with pytest.raises(ModelUnavailable, match="could not be loaded"):
                await engine.run("too_big", "x")
    assert too_big.loads == 0


async def test_warm_up_keeps_the_largest_batch_that_ran(tmp_path: Path) -> None:
    task = TightTask(
        name="tight",
        fits=2,
        tight_from_start=True,
        batching=BatchSettings(batch_size=None, max_batch_size=8),
    )
    async with Engine({"tight": task}, settings(tmp_path)) as engine:
        assert (await engine.run("tight", "x")).value == "X"  # not an unavailable model
        assert engine.batch_size("tight") <= 2
    configured = TightTask(
        name="tight", fits=2, tight_from_start=True, batching=BatchSettings(batch_size=8)
    )
    async with Engine({"tight": configured}, settings(tmp_path)) as engine:
        assert (await engine.run("tight", "x")).value == "X"
        assert engine.batch_size("tight") == 2  # halved from 8 until it fit


async def test_a_batch_that_runs_out_of_memory_is_split_and_later_ones_are_smaller(
    tmp_path: Path,
) -> None:
    task = TightTask(name="tight", fits=1, batching=BatchSettings(batch_size=4, max_wait_ms=100))
    async with Engine({"tight": task}, settings(tmp_path)) as engine:
        results = await asyncio.gather(*(engine.run("tight", f"w{i}x") for i in range(4)))
        assert [r.value for r in results] == [f"W{i}X" for i in range(4)]
        assert engine.batch_size("tight") == 1
    assert all(len(batch) == 1 for batch in task.batches)


async def test_a_single_request_that_does_not_fit_fails_alone(tmp_path: Path) -> None:
    task = TightTask(name="tight", fits=0, batching=BatchSettings(batch_size=1))
    async with Engine({"tight": task}, settings(tmp_path)) as engine:
        with pytest.raises(InferenceFailed, match="ran out of device memory"):
            await engine.run("tight", "x")
        assert not engine.stats().dead


class SlowDownload(EchoTask):
    """Downloads for longer than a load may take, then loads at once."""

    fetched_on: str = ""

    def fetch(self) -> None:
        time.sleep(1.5)
        self.fetched_on = threading.current_thread().name


async def test_a_long_download_happens_outside_the_load_watchdog(tmp_path: Path) -> None:
    task = SlowDownload(name="slow")
    async with Engine({"slow": task}, settings(tmp_path, load_timeout_s=1.0)) as engine:
        assert (await engine.run("slow", "x")).value == "X"
        assert not engine.stats().dead
    assert task.fetched_on and task.fetched_on != "captionbot-device"


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_a_cgroup_cpu_quota_is_read_as_cpus(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    """``docker run --cpus 1.5`` leaves every core visible; the engine's threads must be
    sized to the quota, or they take turns on the cores the quota allows."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_quota(tmp_path) == quota
