"""The contract every model capability implements.

| phase          | runs on                        |
|----------------|--------------------------------|
| ``validate``   | the event loop (cheap checks)  |
| ``preprocess`` | the CPU thread pool            |
| ``forward``    | the single device thread       |
| ``postprocess``| the CPU thread pool            |

``load``, ``sample`` (inputs for warm-up and batch-size measurement) and ``unload`` also run
on the device thread, so they never race a forward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from core.settings import BatchSettings
from core.streams import Stream

RequestT = TypeVar("RequestT", contravariant=True)
PreparedT = TypeVar("PreparedT")
RawT = TypeVar("RawT")
ResultT = TypeVar("ResultT", covariant=True)


class Task(Protocol[RequestT, PreparedT, RawT, ResultT]):
    name: str
    # Lower runs first when several tasks wait for the device.
    priority: int
    batching: BatchSettings

    def validate(self, request: RequestT) -> None:
        """Raise ``InvalidRequest`` for a request that can never succeed."""

    def preprocess(self, request: RequestT) -> PreparedT:
        """Decode and normalise; may raise ``InvalidRequest``."""

    def batch_key(self, item: PreparedT) -> Hashable:
        """Items with equal keys may share one forward."""

    def load(self) -> None:
        """Load the model onto the device."""

    def sample(self, size: int) -> list[PreparedT]:
        """Return ``size`` representative prepared inputs for warm-up and measurement."""

    def forward(self, batch: Sequence[PreparedT]) -> Sequence[RawT]:
        """Run the model on a whole batch; one output per input, in order."""

    def postprocess(self, raw: RawT) -> ResultT:
        """Turn one raw output into a result value."""

    def unload(self) -> None:
        """Free the model and its device memory."""

    def memory_bytes(self) -> int:
        """Bytes the loaded model's weights and buffers take; 0 when not loaded."""

    def describe(self) -> str:
        """One line for logs: model, device, precision."""

    def identity(self) -> str:
        """What the task's outputs depend on besides the request: the model and every
        setting that shapes them (precision, beams, lengths, thresholds, ...). Stable across
        load and unload, so it keys the results cache and the history of load times."""


class StreamingTask(Task[RequestT, PreparedT, RawT, ResultT], Protocol):
    """A task that reports partial results while its forward runs (tokens, steps)."""

    def forward_streaming(
        self, batch: Sequence[PreparedT], streams: Sequence[Stream[object] | None]
    ) -> Sequence[RawT]:
        """``forward`` that publishes partials to each item's stream (None: nobody listens)
        and stops work for items whose stream is ``cancelled``."""

    def render_partial(self, partial: object) -> object:
        """Turn a published partial into what the caller sees (CPU pool), e.g. ids -> text."""


@runtime_checkable
class RecallingTask(Protocol):
    """A task whose forward hands its items on (to the replicas of a cluster), where an
    item can still be withdrawn after its batch has left the engine."""

    def abandon(self, item: Any) -> None:
        """The caller of ``item`` (a prepared input) has gone: do not send it, or cancel
        it where it waits. Called on the event loop, so it must not block."""


# Settings that decide when and how often a task runs, never what it returns.
_SCHEDULING_FIELDS = frozenset({"batching", "priority"})


def output_identity(label: str, settings: Any, *extra: str) -> str:
    """``label#digest`` of every output-shaping field of the ``settings`` dataclass plus
    ``extra`` (such as the resolved precision and device): equal exactly when a task would
    give the same output for the same request."""
    fields = {
        key: value
        for key, value in dataclasses.asdict(settings).items()
        if key not in _SCHEDULING_FIELDS
    }
    canonical = json.dumps([fields, *extra], sort_keys=True, default=str)
    return f"{label}#{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"
