"""The error vocabulary of the core.

Every message here is written for the person who sent the request: it says what went wrong
in one sentence and never leaks paths, stack traces or model internals. Adapters may show
``str(error)`` as it is.
"""

from __future__ import annotations


class CaptionbotError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidRequest(CaptionbotError):
    """The request itself is wrong (bad image, empty question); retrying will not help."""


class ContentFlagged(InvalidRequest):
    """A safety filter withheld the output; retrying the same request will not help."""


class Overloaded(CaptionbotError):
    """Too much work is in flight; the caller should retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = max(1.0, retry_after_s)
        super().__init__(
            f"The bot is busy right now; please try again in about {self.retry_after_s:.0f} s."
        )


class LimitReached(CaptionbotError):
    """A per-user limit (requests at once, or a daily quota) says no for now."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        # When trying again can work: soon for requests at once, midnight UTC for quotas.
        self.retry_after_s = max(1.0, retry_after_s)


class TaskUnavailable(CaptionbotError):
    """The task is not configured, or its model could not be loaded."""


class ModelUnavailable(TaskUnavailable):
    """A task's model cannot be loaded. The message is for users; ``cause`` tells the
    operator why and what to do about it.

    ``retry_after_s`` is None when only the operator can fix it (a gated or unknown model,
    offline mode, a broken checkpoint), so nothing is tried again until a restart;
    otherwise the seconds before the next attempt (the hub did not answer).
    """

    def __init__(self, message: str, cause: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry_after_s = retry_after_s


class OutOfDeviceMemory(Exception):
    """The device has no room for a model or a batch (raised by tasks, never shown to a
    user): the engine makes room and tries again, or splits the batch."""


class InferenceFailed(CaptionbotError):
    """The model failed on this request's batch; other requests are unaffected."""


class NoUsableText(InferenceFailed):
    """The model ran, but what it wrote cleans up to nothing; a sampled request may well
    get text if it is made again."""


class EngineDead(CaptionbotError):
    """The device thread hung or died; no further work can be done by this process."""

    def __init__(
        self, message: str = "The bot's model engine has stopped; an operator must restart it."
    ) -> None:
        super().__init__(message)


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message names the key."""


class ShuttingDown(CaptionbotError):
    """The bot is stopping: it takes no new work, and work it could not finish is ended."""

    def __init__(
        self,
        message: str = "The bot is restarting; please send that again in a minute.",
    ) -> None:
        super().__init__(message)


class DuplicateEvent(Exception):
    """A platform delivered an event the journal has already accepted; never answer twice."""
