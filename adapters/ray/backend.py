"""The bot's side of the Ray backend: the engine's tasks and executor, on a Ray cluster.

The engine keeps everything it does for the service (admission, its batches, place in
line, ETAs, streaming to the caller); what changes is where a task's model runs. Each
task is a ``RemoteTask``: its settings, validation and result identity are the task's
own, while its load deploys a Ray Serve application (``replica.TaskReplica``) and its
forward sends every request of the engine's batch to the replicas, which batch them
again with ``@serve.batch`` across all callers. The calls are at most once: Ray Serve
does not retry a request by itself, and the bot's job journal stays the record of what
was asked. When a replica dies mid-request, the request is sent once more (to a live
replica); a second failure is one clear sentence for the user.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from core.errors import (
    CaptionbotError,
    ConfigError,
    EngineDead,
    InferenceFailed,
    ModelUnavailable,
)
from core.settings import BatchSettings, EngineSettings, RayDeployment, RaySettings

logger = logging.getLogger(__name__)

# Ray starts a whole local cluster, dashboard and all, when any of its calls finds no
# connection, and it reads this switch once, when first imported: a Serve handle's
# thread that is still busy after the bot has left Ray (at shutdown, say) would start
# one in the bot's process. The bot joins or starts Ray itself, in RayBackend.start.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

T = TypeVar("T")

_MB = 1024 * 1024
# Each Ray call waits on a thread of the bot; these are round trips, not computation.
_CALL_THREADS = 64
# A deployment that failed to start is tried again after this long.
_RETRY_DEPLOY_S = 60.0
# How long joining a cluster may take: ray.init retries an address where no Ray answers
# for ever (measured: still retrying after 5 minutes), and the bot must say why instead.
_CONNECT_S = 30.0


@dataclass(frozen=True, slots=True)
class _Failed:
    """One request's failure, carried through the engine's batch to its own caller."""

    error: CaptionbotError


def _withdrawn() -> _Failed:
    """What a request whose caller left stands for in its batch: nobody reads it."""
    return _Failed(InferenceFailed("The request was withdrawn."))


class _Call:
    """One request of the engine's batch on its way to the replicas, which its caller can
    still withdraw: not sent if it has not gone yet, cancelled at the replica if it has
    (Serve drops a cancelled request from the replica's batch before the forward)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.withdrawn = False
        self._lock = threading.Lock()
        self._response: Any = None

    def send(self, method: Any) -> Any:
        """``method.remote(request)``'s response (or stream), or None when the caller
        withdrew the request first."""
        with self._lock:
            if self.withdrawn:
                return None
            self._response = method.remote(self.request)
            return self._response

    def withdraw(self) -> None:
        with self._lock:
            self.withdrawn = True
            response = self._response
        if response is not None:
            # Called on the bot's event loop, and a request already at a replica is
            # cancelled with ray.cancel, a round trip to the cluster. A daemon thread: a
            # recall is never a reason to hold up the bot's exit.
            recall = threading.Thread(
                target=_cancel, args=(response,), name="captionbot-ray-recall", daemon=True
            )
            recall.start()


def _cancel(response: Any) -> None:
    try:
        response.cancel()
    except Exception as exc:  # Ray shutting down, say: the caller is gone all the same
        logger.debug("recalling a request failed: %s", exc)


class RayExecutor:
    """Runs the engine's device calls for the Ray backend: each is a round trip to the
    cluster, so calls run side by side on the bot's threads; the devices are the
    replicas', and each replica orders its own work."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            _CALL_THREADS, thread_name_prefix="captionbot-ray"
        )
        self._closed = False

    @property
    def dead(self) -> bool:
        return self._closed

    async def call(
        self,
        fn: Callable[[], T],
        *,
        priority: int,
        timeout_s: float,
        label: str,
        expected_s: float = 0.0,
    ) -> tuple[T, float]:
        """``fn`` on a thread of the bot. ``timeout_s`` is not applied here: a remote task
        bounds each request's round trip itself, by the same engine settings
        (``forward_timeout_s``, ``load_timeout_s``), so a replica that hangs fails its own
        requests with a sentence instead of stopping the bot's engine for everyone."""
        if self._closed:
            raise EngineDead()
        started = time.monotonic()
        value = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        return value, time.monotonic() - started

    async def aclose(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


class RemoteTask:
    """A task whose model runs in a Ray Serve deployment: the engine sees a task whose
    preprocessing and postprocessing are done remotely and whose forward is the trip."""

    def __init__(
        self, make: Callable[[], Any], deployment: RayDeployment, engine: EngineSettings
    ) -> None:
        # Built here too, never loaded: validation and the results' identity stay local.
        self._make = make
        task = make()
        self._task = task
        self._deployment = deployment
        self._timeout_s = engine.forward_timeout_s
        self._load_timeout_s = engine.load_timeout_s
        self.name: str = task.name
        self.priority: int = task.priority
        # The engine's batch feeds every replica at once; resized when the replicas report
        # the batch size they measured.
        self.batching: BatchSettings = replace(task.batching, batch_size=1)
        self._handle: Any = None
        self._memory = 0
        self._replica_batch = 1

    @property
    def app_name(self) -> str:
        return f"captionbot-{self.name}"

    # -- what stays in the bot ------------------------------------------------------------

    def validate(self, request: Any) -> None:
        self._task.validate(request)

    def identity(self) -> str:
        return str(self._task.identity())

    def describe(self) -> str:
        replicas = self._deployment.replicas
        upto = f"-{self._deployment.max_replicas}" if self._deployment.max_replicas else ""
        return f"{self._task.describe()} on Ray ({replicas}{upto} replicas)"

    def preprocess(self, request: Any) -> _Call:
        return _Call(request)  # prepared on the replica, next to the model's processor

    def abandon(self, item: _Call) -> None:
        item.withdraw()

    def batch_key(self, item: Any) -> Hashable:
        return None  # the replicas group by the task's own key

    def postprocess(self, raw: Any) -> Any:
        if isinstance(raw, _Failed):
            raise raw.error
        value, _seconds = raw
        return value

    def render_partial(self, partial: object) -> object:
        return partial  # rendered on the replica, where the tokenizer is

    def memory_bytes(self) -> int:
        # Not this machine's memory: the local budget never unloads a deployment.
        return 0

    # -- on the cluster ---------------------------------------------------------------------

    def load(self) -> None:
        from ray import serve

        from adapters.ray.replica import TaskReplica

        if not _connected():
            raise EngineDead()
        deployment = self._deployment
        most = max(deployment.replicas, deployment.max_replicas)
        options: dict[str, Any] = {
            "name": self.name,
            "ray_actor_options": {"num_gpus": deployment.gpus, "num_cpus": deployment.cpus},
            # Room for a full batch and the next one gathering behind it.
            "max_ongoing_requests": 2 * self._task.batching.max_batch_size + 2,
            "max_queued_requests": -1,
            # Errors still reach the cluster's logs; a line per request would drown them.
            "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        }
        if deployment.max_replicas > deployment.replicas:
            options["autoscaling_config"] = {
                "min_replicas": deployment.replicas,
                "max_replicas": deployment.max_replicas,
            }
        else:
            options["num_replicas"] = deployment.replicas
        deployment_of: Any = serve.deployment  # its stubs do not describe .options
        app = (
            deployment_of(TaskReplica)
            .options(**options)
            .bind(self._make, int(deployment.memory_budget_mb * _MB))
        )
        # serve.run waits as long as the replicas cannot be placed (no free GPU, say):
        # bounded here by the load timeout, after which the application is taken down.
        deploying = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="captionbot-deploy")
        try:
            started = deploying.submit(serve.run, app, name=self.app_name, route_prefix=None)
            self._handle = started.result(timeout=self._load_timeout_s)
            info = self.replica_info()
        except Exception as exc:
            self._handle = None
            if not _connected():
                raise EngineDead() from exc  # the bot left Ray while this model loaded
            cause = f"{type(exc).__name__}: {exc}"
            reason = self._failed_deployment_reason()
            if reason:
                cause = reason
            if isinstance(exc, TimeoutError):
                serve.delete(self.app_name, _blocking=False)
                cause = (
                    f"its replicas did not start within {self._load_timeout_s:.0f} s "
                    f"(engine.load_timeout_s); are there free resources for "
                    f"{deployment.gpus:g} GPUs and {deployment.cpus:g} CPUs per replica?"
                )
            raise ModelUnavailable(
                f"The {self.name} model could not start on the Ray cluster.", cause, _RETRY_DEPLOY_S
            ) from exc
        finally:
            deploying.shutdown(wait=False)
        self._memory = int(info["memory_bytes"])
        self._replica_batch = batch = int(info["batch_size"])
        self.batching = replace(self.batching, batch_size=batch * most, max_batch_size=batch * most)
        logger.info(
            "%s deployed on Ray: %d-%d replicas, batches of %d, %.0f MB and %d math threads each",
            self.name,
            deployment.replicas,
            most,
            batch,
            self._memory / _MB,
            int(info["threads"]),
        )

    def replica_info(self) -> dict[str, int]:
        """What a replica reports: the batch size it measured, its model's memory, and
        the math threads its forwards run with."""
        if self._handle is None:
            raise EngineDead()
        info: dict[str, int] = self._handle.info.remote().result(timeout_s=self._load_timeout_s)
        return info

    def _failed_deployment_reason(self) -> str:
        """The last line of what the replica raised, which Serve keeps in its status (the
        exception serve.run raises says only that the deployment failed)."""
        from ray import serve

        try:
            app = serve.status().applications[self.app_name]
            message = app.deployments[self.name].message
        except Exception:  # no status to read: the caller keeps serve.run's own error
            return ""
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def unload(self) -> None:
        if self._handle is None:
            return
        from ray import serve

        self._handle = None
        if _connected():
            serve.delete(self.app_name)

    def sample(self, size: int) -> list[Any]:
        from adapters.ray.replica import WARM_UP

        return [_Call(WARM_UP) for _ in range(size)]

    def forward(self, batch: Sequence[Any]) -> list[Any]:
        """Every request to the replicas at once; each result or failure is its own.

        ``forward_timeout_s`` bounds each Ray batch the requests make: one deadline for
        all, as they run side by side (waiting for each in turn with a timeout of its own
        could take the batch's size times as long), stretched when the replicas up (at
        least ``replicas``) need several batches for them. It counts a request's wait at
        the replicas too, which a burst of the engine's batches can lengthen."""
        at_once = self._replica_batch * self._deployment.replicas
        deadline = time.monotonic() + self._timeout_s * math.ceil(len(batch) / at_once)
        responses = [self._send(call) for call in batch]
        return [
            self._outcome(call, response, deadline)
            for call, response in zip(batch, responses, strict=True)
        ]

    def _send(self, call: _Call) -> Any:
        if self._handle is None:
            raise EngineDead()
        return call.send(self._handle.run)

    def _outcome(self, call: _Call, response: Any, deadline: float) -> Any:
        from ray.exceptions import RayActorError

        for attempt in (1, 2):
            if response is None:
                return _withdrawn()
            try:
                return response.result(timeout_s=max(0.0, deadline - time.monotonic()))
            except RayActorError as died:
                if call.withdrawn:
                    return _withdrawn()
                if (failed := self._replica_died(died, attempt)) is not None:
                    return failed
                response = self._send(call)
                # The request starts over on another replica, with its own full time.
                deadline = max(deadline, time.monotonic() + self._timeout_s)
            except Exception as exc:
                if call.withdrawn:
                    return _withdrawn()  # cancelled for its caller, who is gone
                if isinstance(exc, TimeoutError):
                    response.cancel()  # nobody waits for it any more
                return _Failed(self._error(exc))
        raise AssertionError("unreachable")  # pragma: no cover

    def _replica_died(self, died: Exception, attempt: int) -> _Failed | None:
        """After a first death, None: the request goes once more (Ray routes it to a live
        replica). After a second, the one sentence the user gets."""
        if attempt == 1:
            logger.warning(
                "%s: a replica died mid-request; sending it once more: %s", self.name, died
            )
            return None
        logger.error("%s: a replica died twice on one request: %s", self.name, died)
        return _Failed(
            InferenceFailed(
                f"The {self.name} model's server stopped twice while working on this "
                "request; please try again."
            )
        )

    def _error(self, exc: Exception) -> CaptionbotError:
        """What the replica raised, as the user should hear it."""
        if isinstance(exc, CaptionbotError):
            return exc
        cause = getattr(exc, "cause", None)
        if isinstance(cause, CaptionbotError):
            return cause
        if isinstance(exc, TimeoutError):
            return InferenceFailed(
                f"The {self.name} model took longer than {self._timeout_s:.0f} s; please try again."
            )
        logger.error("%s failed on the Ray cluster", self.name, exc_info=exc)
        return InferenceFailed(f"The {self.name} model failed on this request; please try again.")


class RemoteStreamingTask(RemoteTask):
    """A streaming task on Ray: partials come back as the replica makes them."""

    def forward_streaming(self, batch: Sequence[Any], streams: Sequence[Any]) -> list[Any]:
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            return list(pool.map(self._stream_one, batch, streams))

    def _stream_one(self, call: _Call, stream: Any) -> Any:
        from ray.exceptions import RayActorError

        for attempt in (1, 2):
            if self._handle is None:
                raise EngineDead()
            events = call.send(self._handle.options(stream=True).stream)
            if events is None:
                return _withdrawn()
            # A stream has no timeout of its own: past the forward's, it is cancelled.
            timed_out = threading.Event()
            late = threading.Timer(self._timeout_s, _cancel_late, (events, timed_out))
            late.daemon = True
            late.start()
            try:
                for kind, value, seconds in events:
                    if stream is not None and stream.cancelled:
                        events.cancel()
                        return _withdrawn()
                    if kind == "partial":
                        if stream is not None:
                            stream.publish(value)
                    else:
                        return (value, seconds)
                if call.withdrawn:
                    return _withdrawn()
                ended = RuntimeError("the stream ended without a result")
                return _Failed(self._error(TimeoutError() if timed_out.is_set() else ended))
            except RayActorError as died:
                if call.withdrawn:
                    return _withdrawn()
                if (failed := self._replica_died(died, attempt)) is not None:
                    return failed
            except Exception as exc:
                if call.withdrawn:
                    return _withdrawn()  # cancelled for its caller, who is gone
                return _Failed(self._error(TimeoutError() if timed_out.is_set() else exc))
            finally:
                late.cancel()
        raise AssertionError("unreachable")  # pragma: no cover


def _connected() -> bool:
    """Whether this process is still on Ray. Serve's calls (serve.run, status, delete)
    start a local Ray of their own when it is not, so none is made once the bot left."""
    import ray

    return bool(ray.is_initialized())


def _cancel_late(events: Any, timed_out: threading.Event) -> None:
    timed_out.set()  # before the cancel wakes the reader, so that it tells a timeout
    events.cancel()


class RayBackend:
    """Connects to (or starts) Ray and Serve, and makes the engine's remote tasks."""

    def __init__(
        self, settings: RaySettings, engine: EngineSettings, *, replica_logs: bool = True
    ) -> None:
        """``replica_logs``: a Ray started here prints its workers' logs with the bot's."""
        self._settings = settings
        self._engine = engine
        self._replica_logs = replica_logs
        self._started_here = False

    def start(self) -> None:
        """Join the cluster at ``address``, or start a Ray in this machine when it is empty;
        blocking (seconds), so call it off the event loop."""
        # Ray's C++ crash handler in this process would take SIGTERM too, print a stack and
        # end the process mid-drain; the bot's own handler lets answers in flight finish.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        try:
            import ray
            from ray import serve
        except ModuleNotFoundError as missing:
            raise ConfigError(
                "engine.backend = \"ray\" needs Ray: pip install -e '.[ray]' in the project "
                "folder, with the same version on the cluster"
            ) from missing

        if not ray.is_initialized():
            if self._settings.address:
                _join(self._settings.address)
            else:
                # A self-hosted bot reports nothing home unless its operator says so.
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(
                    num_cpus=self._settings.num_cpus or None,
                    include_dashboard=False,
                    log_to_driver=self._replica_logs,
                    namespace="captionbot",
                    # The replicas import this bot's code from the same folders.
                    runtime_env={"env_vars": {"PYTHONPATH": _python_path()}},
                )
                self._started_here = True
        # Only handles are used: no HTTP proxy, no port opened on the cluster.
        serve.start(proxy_location="Disabled")

    def tasks(self, factories: Mapping[str, Callable[[], Any]]) -> dict[str, RemoteTask]:
        """A remote task for each of ``factories``, which replicas call to build theirs."""
        remote: dict[str, RemoteTask] = {}
        for name, make in factories.items():
            remote[name] = _remote_kind(make)(make, self._settings.deployment(name), self._engine)
        return remote

    def stop(self) -> None:
        """Stop the Ray this bot started, with every deployment on it. On a shared cluster
        the deployments stay, so a restarted bot finds its models warm."""
        import ray
        from ray import serve

        if not self._started_here:
            return
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


def _join(address: str) -> None:
    """Connect this process to the cluster at ``address``, or say why it cannot."""
    import ray

    where = f'engine.backend = "ray" with ray.address = {address!r}'
    host, port = cluster_address(address)
    if port is not None:
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise ConfigError(
                f"{where}, but nothing answers at {host}:{port} ({exc.strerror or exc}); "
                "is `ray start --head` running there, and is the port open to this machine?"
            ) from exc
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, namespace="captionbot")
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    # A daemon thread: if Ray never answers, it must not keep the process from exiting.
    joining = threading.Thread(target=connect, name="captionbot-ray-join", daemon=True)
    joining.start()
    joining.join(_CONNECT_S)
    if joining.is_alive():
        raise ConfigError(
            f"{where}, but joining that cluster did not finish within {_CONNECT_S:.0f} s; "
            "is it a Ray head (the GCS port, 6379 by default, or ray:// and 10001)?"
        )
    if failure:
        raise ConfigError(f"{where}, but Ray could not join it: {failure[0]}") from failure[0]


def cluster_address(address: str) -> tuple[str, int | None]:
    """``ray.address`` as the host and port to try before joining (no port for ``auto``,
    which Ray looks up itself); ConfigError for what is not the address of a Ray head."""
    if address == "auto":
        return address, None
    found = re.fullmatch(r"(?:ray://)?([^\s:/]+):(\d+)", address)
    if found is None:
        raise ConfigError(
            'ray.address is "" (a Ray started here), "auto", "host:port" or '
            f'"ray://host:port"; got {address!r}'
        )
    return found[1], int(found[2])


def _remote_kind(make: Callable[[], Any]) -> type[RemoteTask]:
    task_class = getattr(make, "func", make)
    streams = hasattr(task_class, "forward_streaming")
    return RemoteStreamingTask if streams else RemoteTask


def _python_path() -> str:
    folders = [folder for folder in sys.path if folder and Path(folder).is_dir()]
    return os.pathsep.join(dict.fromkeys([str(Path.cwd()), *folders]))
