"""Fake tasks that implement the real Task protocol, for testing the engine itself."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InvalidRequest, NoUsableText
from core.settings import BatchSettings
from core.streams import Stream
from core.types import Caption, CaptionRequest, OcrRequest, OcrResult


@dataclass
class Item:
    value: str
    key: Hashable = "default"


@dataclass
class EchoTask:
    """Upper-cases strings; records every batch and the threads each phase ran on."""

    name: str = "echo"
    priority: int = 0
    batching: BatchSettings = field(
        default_factory=lambda: BatchSettings(batch_size=4, max_wait_ms=50)
    )
    # Seconds a forward of n items takes, simulated with sleep (which releases the GIL).
    cost: Callable[[int], float] = lambda n: 0.0
    gate: threading.Event | None = None
    fail_on: str | None = None
    # A value whose forward ends the process, as a driver fault or the OOM killer would.
    exit_on: str | None = None
    # A value whose forward takes ``slow_s`` seconds, as a hung device call would.
    slow_on: str | None = None
    slow_s: float = 0.0
    # A file each finished forward appends "<pid> <value>" lines to (across processes).
    log_to: str | None = None
    wrong_count: bool = False
    load_error: Exception | None = None
    batches: list[list[str]] = field(default_factory=list)
    threads: dict[str, set[str]] = field(default_factory=dict)
    loads: int = 0
    unloads: int = 0
    # What memory_bytes reports once loaded.
    size_mb: float = 1.0
    resident: bool = False
    # Values whose callers left after handing them to the engine (``abandon``).
    abandoned: list[str] = field(default_factory=list)

    def _seen(self, phase: str) -> None:
        self.threads.setdefault(phase, set()).add(threading.current_thread().name)

    def validate(self, request: str) -> None:
        if not request:
            raise InvalidRequest("The text is empty.")

    def preprocess(self, request: str) -> Item:
        self._seen("preprocess")
        if request == "crash":
            raise KeyError("internal detail /secret/path")
        key, _, value = request.rpartition(":")
        return Item(value, key or "default")

    def batch_key(self, item: Item) -> Hashable:
        return item.key

    def load(self) -> None:
        self._seen("load")
        if self.load_error is not None:
            raise self.load_error
        self.loads += 1
        self.resident = True

    def sample(self, size: int) -> list[Item]:
        return [Item(f"warm{i}", "warmup") for i in range(size)]

    def forward(self, batch: Sequence[Item]) -> Sequence[str]:
        self._seen("forward")
        if not self.resident:
            raise RuntimeError("forward on an unloaded model")
        values = [item.value for item in batch]
        if not all(v.startswith("warm") for v in values):
            self.batches.append(values)
            if self.gate is not None:
                self.gate.wait(10)
        time.sleep(self.cost(len(batch)))
        if self.slow_on is not None and self.slow_on in values:
            time.sleep(self.slow_s)
        if self.exit_on is not None and self.exit_on in values:
            os._exit(1)
        if self.fail_on is not None and self.fail_on in values:
            raise RuntimeError("simulated CUDA error")
        self._log(values)
        outputs = [v.upper() for v in values]
        return outputs[:-1] if self.wrong_count else outputs

    def _log(self, values: Sequence[str]) -> None:
        if self.log_to is not None:
            with Path(self.log_to).open("a", encoding="utf-8") as log:
                log.writelines(f"{os.getpid()} {value}\n" for value in values)

    def postprocess(self, raw: str) -> str:
        self._seen("postprocess")
        return raw

    def abandon(self, item: Item) -> None:
        self.abandoned.append(item.value)

    def unload(self) -> None:
        self._seen("unload")
        self.unloads += 1
        self.resident = False

    def memory_bytes(self) -> int:
        return int(self.size_mb * 1024 * 1024) if self.resident else 0

    def describe(self) -> str:
        return "echo on a fake device"

    def identity(self) -> str:
        return f"{self.name}: echo"


@dataclass
class CountingTask(EchoTask):
    """Streams "step i of n" while it counts to n, stopping rows whose caller left."""

    name: str = "count"
    steps: int = 20
    step_s: float = 0.02
    steps_run: list[int] = field(default_factory=list)

    def forward_streaming(
        self, batch: Sequence[Item], streams: Sequence[Stream[object] | None]
    ) -> Sequence[str]:
        done = 0
        for step in range(1, self.steps + 1):
            if all(s is not None and s.cancelled for s in streams):
                break
            time.sleep(self.step_s)
            done = step
            for stream in streams:
                if stream is not None:
                    stream.publish(step)
        self.steps_run.append(done)
        self._log([item.value for item in batch])
        return [f"{item.value}:{done}" for item in batch]

    def render_partial(self, partial: object) -> object:
        return f"step {partial} of {self.steps}"


@dataclass(frozen=True)
class FileGate:
    """A ``threading.Event`` that holds across processes (a Ray replica's forward waits on
    the test's ``set``): open while its file exists."""

    path: Path

    def set(self) -> None:
        self.path.touch()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def wait(self, timeout: float) -> bool:
        ends = time.monotonic() + timeout
        while not self.path.exists():
            if time.monotonic() >= ends:
                return False
            time.sleep(0.01)
        return True


@dataclass
class FakeCaptioner:
    """The ``caption`` task's contract without a model: "A picture of N bytes." per image,
    after ``gate`` opens (when given). Counts every item it computes."""

    name: str = "caption"
    priority: int = 1
    batching: BatchSettings = field(
        default_factory=lambda: BatchSettings(batch_size=4, max_wait_ms=5)
    )
    gate: threading.Event | FileGate | None = None
    items: int = 0
    version: str = "v1"
    # How many sampled captions come out as no usable text, as a random draw can.
    unusable_samples: int = 0

    def validate(self, request: CaptionRequest) -> None:
        if not request.image:
            raise InvalidRequest("The image is empty.")

    def preprocess(self, request: CaptionRequest) -> tuple[int, bool]:
        return len(request.image), request.sample

    def batch_key(self, item: tuple[int, bool]) -> Hashable:
        return item[1]

    def load(self) -> None:
        pass

    def sample(self, size: int) -> list[tuple[int, bool]]:
        return [(0, False)] * size

    def forward(self, batch: Sequence[tuple[int, bool]]) -> list[str]:
        if self.gate is not None and any(size for size, _ in batch):
            self.gate.wait(30)
        self.items += sum(1 for size, _ in batch if size)
        return [
            f"a picture of {size} bytes" + (f", take {self.items}" if sample else "")
            for size, sample in batch
        ]

    def postprocess(self, raw: str) -> Caption:
        if ", take" in raw and self.unusable_samples > 0:
            self.unusable_samples -= 1
            raise NoUsableText("The caption model could not describe this image.")
        return Caption(raw[0].upper() + raw[1:] + ".")

    def unload(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0

    def describe(self) -> str:
        return "fake captioner"

    def identity(self) -> str:
        return f"fake-captioner {self.version}"


@dataclass
class FakeReader:
    """The ``ocr`` task's contract without a model: no text in any image."""

    name: str = "ocr"
    priority: int = 0
    batching: BatchSettings = field(default_factory=lambda: BatchSettings(batch_size=1))
    items: int = 0

    def validate(self, request: OcrRequest) -> None:
        pass

    def preprocess(self, request: OcrRequest) -> int:
        return len(request.image)

    def batch_key(self, item: int) -> Hashable:
        return None

    def load(self) -> None:
        pass

    def sample(self, size: int) -> list[int]:
        return [0] * size

    def forward(self, batch: Sequence[int]) -> list[int]:
        self.items += sum(1 for size in batch if size)
        return list(batch)

    def postprocess(self, raw: int) -> OcrResult:
        return OcrResult(())

    def unload(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0

    def describe(self) -> str:
        return "fake reader"

    def identity(self) -> str:
        return "fake-reader"


class OutOfMemoryError(RuntimeError):
    """What torch.cuda raises when the device is full (the engine matches it by name)."""


@dataclass
class FakeDevice:
    """A GPU's memory in megabytes, shared by the fake tasks loaded on it."""

    capacity_mb: float
    used_mb: float = 0.0


@dataclass
class HungryTask(EchoTask):
    """Takes ``size_mb`` of its FakeDevice while loaded. A load that does not fit fails as
    transformers 5.24 fails when bitsandbytes runs out of memory while quantizing: a plain
    RuntimeError, not an out-of-memory error."""

    device: FakeDevice = field(default_factory=lambda: FakeDevice(1e9))

    def load(self) -> None:
        if self.device.used_mb + self.size_mb > self.device.capacity_mb:
            raise RuntimeError("Error(s) in loading state_dict for the quantized model")
        self.device.used_mb += self.size_mb
        super().load()

    def unload(self) -> None:
        if self.resident:
            self.device.used_mb -= self.size_mb
        super().unload()


@dataclass
class TightTask(EchoTask):
    """Runs out of device memory on batches larger than ``fits`` (warm-up batches of its
    own samples included, from ``tight_from_start``)."""

    fits: int = 1
    tight_from_start: bool = False

    def forward(self, batch: Sequence[Item]) -> Sequence[str]:
        warm = all(item.value.startswith("warm") for item in batch)
        if len(batch) > self.fits and (self.tight_from_start or not warm):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(batch)
