"""The engine and the service on both backends: this process's device and Ray Serve.

One local Ray (2 CPUs) is started for the module (``ray_backend`` in conftest); each test
deploys its tasks and takes them down after.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.ray import RayBackend, RemoteTask
from adapters.sqlite import SqliteStore
from bot.bench import picture
from bot.config import parse_settings
from bot.wiring import engine_for
from core.engine import Outcome, Partial
from core.errors import InferenceFailed, InvalidRequest, ModelUnavailable
from core.ports import ChatRef, UserRef
from core.service import Service
from core.settings import BatchSettings, RayDeployment
from core.types import Origin, Upload, Waiting, WarmingUp
from tests.backends import BACKENDS, delete_ray_apps, engine_on
from tests.fakes import CountingTask, EchoTask


async def test_sigterm_mid_request_lets_the_answer_finish_and_takes_ray_down(
    tmp_path: Path, model_cache: Path
) -> None:
    """``python -m bot run`` in its own process with a Ray it starts, as an operator tries
    the backend: an answer in flight at SIGTERM still comes whole, and the bot exits 0
    (Ray's own crash handler in the driver used to end the process mid-drain)."""
    port = _free_port()
    config = tmp_path / "config.toml"
    tasks = ("caption", "ocr", "tags", "mood", "write", "vqa", "reimagine")
    config.write_text(
        f'profile = "tiny"\n[engine]\nbackend = "ray"\nmodel_cache = "{model_cache}"\n'
        f'[web]\nport = {port}\n[store]\ndatabase = "{tmp_path / "db.sqlite3"}"\n'
        f'images_dir = "{tmp_path / "images"}"\n[ray]\nnum_cpus = 2\n'
        + "".join(f"[ray.{task}]\ncpus = 0.2\n" for task in tasks)
    )
    log = tmp_path / "bot.log"
    environment = {**os.environ, "TELEGRAM_BOT_TOKEN": "", "DISCORD_BOT_TOKEN": ""}
    with log.open("wb") as output:
        bot = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", "--config", str(config),
            stdout=output, stderr=subprocess.STDOUT, env=environment,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}/api/describe"
            async with aiohttp.ClientSession() as http:
                await _wait_until_up(http, f"http://127.0.0.1:{port}/healthz", bot)
                # The first answer deploys the models; the second is the one cut short.
                assert (await _describe(http, url, 1))[-1]["part"] == "social"
                second = asyncio.ensure_future(_describe(http, url, 2))
                await asyncio.sleep(1.0)
                assert not second.done()
                bot.send_signal(signal.SIGTERM)
                parts = await asyncio.wait_for(second, 120)
            assert parts[-1]["part"] == "social"
            assert await asyncio.wait_for(bot.wait(), 120) == 0
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()
    text = log.read_text(errors="replace")
    assert "SIGTERM received" not in text and "stopping" in text


async def test_a_cluster_address_where_nothing_answers_is_one_line_at_start(
    tmp_path: Path,
) -> None:
    """``ray.init`` would retry such an address for ever; the bot says why and exits 2."""
    port = _free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'profile = "tiny"\n[engine]\nbackend = "ray"\n[ray]\naddress = "127.0.0.1:{port}"\n'
        f'[web]\nport = {_free_port()}\n[store]\ndatabase = "{tmp_path / "db.sqlite3"}"\n'
    )
    environment = {**os.environ, "TELEGRAM_BOT_TOKEN": "", "DISCORD_BOT_TOKEN": ""}
    bot = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", "--config", str(config),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(bot.communicate(), 60)
    assert bot.returncode == 2
    errors = [line for line in output.decode().splitlines() if "configuration error" in line]
    assert len(errors) == 1
    assert f"nothing answers at 127.0.0.1:{port}" in errors[0]
    assert "ray start --head" in errors[0]


def test_an_address_that_answers_but_is_no_ray_head_is_one_line_after_the_wait() -> None:
    """A port that accepts connections and says nothing: ``ray.init`` would wait for
    ever; joining gives up after ``_CONNECT_S`` and the process still exits at once."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        joining = (
            "import adapters.ray.backend as b; b._CONNECT_S = 3\n"
            "try:\n"
            f"    b._join('127.0.0.1:{port}')\n"
            "except b.ConfigError as exc:\n"
            "    print('refused:', exc)\n"
        )
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", joining], capture_output=True, text=True, timeout=60
        )
        elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "did not finish within 3 s" in done.stdout
    assert elapsed < 30  # the join still running in its thread does not hold the exit


def test_a_ray_call_once_the_bot_has_left_ray_starts_no_cluster_of_its_own() -> None:
    """Ray and Serve start a whole local cluster for a call that finds no connection. A
    model still loading when the bot left Ray called serve.status on its way out and
    started one in the test process, whose loss 60 s later ended the whole run."""
    code = (
        "import ray\n"
        "from adapters.ray import RemoteTask\n"
        "from core.settings import EngineSettings, RayDeployment\n"
        "from tests.fakes import EchoTask\n"
        "task = RemoteTask(EchoTask, RayDeployment(cpus=0.2), EngineSettings())\n"
        "for call in (lambda: ray.put(1), task.load, task.unload):\n"
        "    try:\n        call()\n    except Exception as refused:\n"
        "        print(type(refused).__name__)\n"
        "print('started:', ray.is_initialized())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "started: False" in done.stdout, done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_until_up(
    http: aiohttp.ClientSession, url: str, bot: asyncio.subprocess.Process
) -> None:
    for _ in range(600):
        if bot.returncode is not None:
            raise AssertionError(f"the bot exited with {bot.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise AssertionError("the bot did not come up")


async def _describe(http: aiohttp.ClientSession, url: str, number: int) -> list[dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("image", picture(number), filename=f"photo{number}.png")
    origin = url.split("/api/")[0]
    async with http.post(url, data=form, headers={"Origin": origin}) as response:
        assert response.status == 200
        return [json.loads(line) for line in (await response.text()).splitlines()]


async def test_concurrent_requests_are_answered_each_with_its_own_result(
    backend: str,
) -> None:
    echo = functools.partial(EchoTask, batching=BatchSettings(batch_size=4, max_wait_ms=50))
    async with engine_on(backend, {"echo": echo}) as engine:
        words = [f"word{n}" for n in range(10)]
        outcomes = await asyncio.gather(*(engine.run("echo", word) for word in words))
        assert [o.value for o in outcomes] == [word.upper() for word in words]
        # One request's failure is its own; the engine goes on.
        with pytest.raises(InferenceFailed) as failed:
            await engine.run("echo", "crash")
        assert "secret" not in str(failed.value)
        with pytest.raises(InvalidRequest):
            await engine.run("echo", "")
        assert (await engine.run("echo", "again")).value == "AGAIN"
        assert engine.stats().tasks[0].loaded


async def test_a_streaming_task_sends_its_partials_then_its_result(
    backend: str,
) -> None:
    counting = functools.partial(CountingTask, steps=6, step_s=0.15)
    async with engine_on(backend, {"count": counting}) as engine:
        await engine.ensure_loaded("count")
        partials: list[object] = []
        outcome: Outcome | None = None
        async for event in engine.stream("count", "go"):
            if isinstance(event, Partial):
                partials.append(event.value)
            elif isinstance(event, Outcome):
                outcome = event
        assert outcome is not None and outcome.value == "go:6"
        assert partials and all(p in {f"step {n} of 6" for n in range(1, 7)} for p in partials)
        # Partials come in order: a reader never sees the count go back.
        assert [int(str(p).split()[1]) for p in partials] == sorted(
            int(str(p).split()[1]) for p in partials
        )


async def test_a_replica_killed_mid_batch_loses_no_request_and_answers_none_twice(
    ray_backend: RayBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import ray

    log = tmp_path / "forwards.log"
    slow = functools.partial(
        EchoTask,
        name="echo",
        batching=BatchSettings(batch_size=2, max_wait_ms=20),
        cost=lambda n: 0.6,
        log_to=str(log),
    )
    two = {"echo": RayDeployment(replicas=2, cpus=0.2)}
    async with engine_on("ray", {"echo": slow}, two) as engine:
        await engine.ensure_loaded("echo")
        log.write_text("")
        words = [f"word{n}" for n in range(12)]
        runs = [asyncio.ensure_future(engine.run("echo", word)) for word in words]
        await asyncio.sleep(0.3)  # the first batches are in their forwards
        replicas = [
            actor
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::captionbot-echo#")
        ]
        assert len(replicas) == 2
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(victim, no_restart=True)
        outcomes = await asyncio.gather(*runs)
    assert [o.value for o in outcomes] == [word.upper() for word in words]
    assert any("died mid-request" in record.getMessage() for record in caplog.records)
    finished = [line.split()[1] for line in log.read_text().splitlines()]
    # Every word finished a forward, none twice: the killed replica's batch never ended,
    # and its words were sent once more, to the replica that lived.
    assert sorted(finished) == sorted(words)


@pytest.mark.parametrize("streaming", [False, True], ids=["answer", "stream"])
async def test_a_request_whose_caller_left_is_withdrawn_where_it_waits_at_the_replica(
    ray_backend: RayBackend, tmp_path: Path, streaming: bool
) -> None:
    """Already sent to a busy replica, a request whose caller has gone is cancelled where
    it waits and never reaches a forward; the request sent beside it is answered."""
    log = tmp_path / "forwards.log"
    one_at_a_time = BatchSettings(batch_size=1, max_batch_size=1, max_wait_ms=1)
    make: Any
    if streaming:
        make = functools.partial(
            CountingTask, batching=one_at_a_time, steps=30, step_s=0.1, log_to=str(log)
        )
    else:
        make = functools.partial(
            EchoTask, batching=one_at_a_time, slow_on="first", slow_s=3.0, log_to=str(log)
        )
    name = make().name
    async with engine_on("ray", {name: make}) as engine:
        await engine.ensure_loaded(name)
        task = engine.task(name)
        assert isinstance(task, RemoteTask)

        def send(calls: list[Any]) -> list[Any]:
            if streaming:
                return task.forward_streaming(calls, [None] * len(calls))  # type: ignore[attr-defined, no-any-return]
            return task.forward(calls)

        log.write_text("")
        busy = asyncio.ensure_future(asyncio.to_thread(send, [task.preprocess("first")]))
        await asyncio.sleep(0.5)  # "first" holds the replica's forward for 3 s
        doomed, kept = task.preprocess("doomed"), task.preprocess("kept")
        waiting = asyncio.ensure_future(asyncio.to_thread(send, [doomed, kept]))
        await asyncio.sleep(0.5)  # both wait at the replica, a batch of one at a time
        task.abandon(doomed)
        [first_raw], [doomed_raw, kept_raw] = await busy, await waiting
    assert str(task.postprocess(first_raw)).lower().startswith("first")
    assert str(task.postprocess(kept_raw)).lower().startswith("kept")
    with pytest.raises(InferenceFailed, match="withdrawn"):
        task.postprocess(doomed_raw)
    finished = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(finished) == ["first", "kept"]


async def test_a_request_that_kills_every_replica_it_reaches_gets_one_sentence(
    ray_backend: RayBackend,
) -> None:
    poison = functools.partial(
        EchoTask, batching=BatchSettings(batch_size=1, max_wait_ms=1), exit_on="poison"
    )
    two = {"echo": RayDeployment(replicas=2, cpus=0.2)}
    async with engine_on("ray", {"echo": poison}, two) as engine:
        await engine.ensure_loaded("echo")
        with pytest.raises(InferenceFailed, match="stopped twice"):
            await engine.run("echo", "poison")
        # Serve replaces the replicas it lost; the next request is answered.
        assert (await asyncio.wait_for(engine.run("echo", "fine"), 120)).value == "FINE"


async def test_a_model_over_its_replicas_memory_budget_is_refused_with_the_reason(
    ray_backend: RayBackend,
) -> None:
    """Models sharing a GPU: a replica whose model outgrows its share does not start, and
    the user hears the model is unavailable, not an out-of-memory crash."""
    big = functools.partial(EchoTask, size_mb=8.0)
    budget = {"echo": RayDeployment(cpus=0.2, memory_budget_mb=4.0)}
    async with engine_on("ray", {"echo": big}, budget) as engine:
        with pytest.raises(ModelUnavailable) as refused:
            await engine.run("echo", "hello")
    assert "could not start on the Ray cluster" in str(refused.value)
    assert "takes 8 MB, more than the 4 MB" in refused.value.cause


async def test_the_service_describes_an_image_alike_on_both_backends(
    model_cache: Path, tmp_path: Path, ray_backend: RayBackend
) -> None:
    """The tiny profile's real tasks (real EasyOCR) as deployments: the same image gets the
    same caption, text and hashtags as on this process's device."""
    parts: dict[str, dict[str, str]] = {}
    for backend in BACKENDS:
        small = {task: {"cpus": 0.2} for task in ("caption", "ocr", "tags", "mood", "write")}
        settings = parse_settings(
            {
                "engine": {"backend": backend, "model_cache": str(model_cache), "device": "cpu"},
                "ray": small,
            }
        )
        folder = tmp_path / backend
        async with (
            SqliteStore.open(folder / "db.sqlite3", folder / "images") as store,
            engine_for(settings, ["caption", "ocr", "tags", "mood", "write"]) as engine,
        ):
            service = Service(engine, store, settings.service)
            origin = Origin(UserRef("test", "1"), ChatRef("test", "1"))
            shown: dict[str, str] = {}
            async with service.describe(origin, Upload(picture(3), "photo.png")) as reply:
                async for part in reply:
                    if not isinstance(part, Waiting | WarmingUp):
                        shown[type(part).__name__] = str(part)
            await service.shutdown(5)
        if backend == "ray":
            await asyncio.to_thread(delete_ray_apps)
        parts[backend] = shown
    local, remote = parts["local"], parts["ray"]
    assert {"Caption", "OcrResult", "Tags", "SocialCaption"} <= set(remote)
    for kind in ("Caption", "OcrResult", "Tags"):
        assert remote[kind] == local[kind]


async def test_a_replica_that_hangs_fails_its_requests_once_the_forward_time_is_up(
    ray_backend: RayBackend,
) -> None:
    """A batch's requests share one deadline: four stuck requests fail together after the
    forward timeout, not one after another, and the engine goes on."""
    hung = functools.partial(
        EchoTask, batching=BatchSettings(batch_size=4, max_wait_ms=200), slow_on="stuck", slow_s=8
    )
    async with engine_on("ray", {"echo": hung}, forward_timeout_s=3.0) as engine:
        await engine.ensure_loaded("echo")
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(engine.run("echo", "stuck") for _ in range(4)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(o, InferenceFailed) for o in outcomes), outcomes
        assert all("took longer than 3 s" in str(o) for o in outcomes)
        assert elapsed < 6.5  # one timeout; waiting for each in turn took 12 s
        await asyncio.sleep(max(0.0, 8.5 - (time.monotonic() - started)))  # the replica is free
        assert (await engine.run("echo", "fine")).value == "FINE"


async def test_a_stream_that_hangs_fails_once_the_forward_time_is_up(
    ray_backend: RayBackend,
) -> None:
    endless = functools.partial(CountingTask, steps=100, step_s=0.1)
    async with engine_on("ray", {"count": endless}, forward_timeout_s=2.0) as engine:
        await engine.ensure_loaded("count")
        started = time.monotonic()
        with pytest.raises(InferenceFailed, match="took longer than 2 s"):
            async for _event in engine.stream("count", "go"):
                pass
        assert time.monotonic() - started < 6.0  # the count alone takes 10 s


@pytest.mark.parametrize(("cpus", "threads"), [(0.2, 1), (2.0, 2)])
async def test_a_replica_computes_with_the_cores_ray_reserved_for_it(
    ray_backend: RayBackend, caplog: pytest.LogCaptureFixture, cpus: float, threads: int
) -> None:
    """One math team of the replica's size for its forwards; preparing requests on
    one-thread teams beside it does not shrink it (torch's count does not stick to a
    thread by itself)."""
    deployment = {"echo": RayDeployment(cpus=cpus)}
    async with engine_on("ray", {"echo": EchoTask}, deployment) as engine:
        with caplog.at_level(logging.INFO, logger="adapters.ray.backend"):
            await engine.ensure_loaded("echo")
        assert f"{threads} math threads each" in caplog.text
        await asyncio.gather(*(engine.run("echo", f"word{n}") for n in range(8)))
        task = engine.task("echo")
        assert isinstance(task, RemoteTask)
        assert (await asyncio.to_thread(task.replica_info))["threads"] == threads
