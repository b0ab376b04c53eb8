"""The error tree.

    OurvidzError
    ├── ConfigError              the environment is wrong; a worker refuses to start
    ├── FetchError               a reference image could not be used
    │   ├── UnsafeReference      refused before any request (scheme, address)
    │   └── ReferenceUnavailable unreachable, 404, undecodable or over the caps
    ├── DeliveryError            storage or callback endpoint failed for good
    │   └── DeliveryRefused      the endpoint answered 4xx: retrying won't help
    └── JobError                 ends a job; carries the wire ``code`` and ``retryable``
        ├── InvalidJob                INVALID_JOB
        ├── InvalidPrompt             INVALID_PROMPT
        ├── OutOfMemory               OOM_ERROR
        ├── ModelLoadError            MODEL_LOAD_ERROR
        ├── WorkerUnavailable         WORKER_UNAVAILABLE
        ├── JobTimeout                TIMEOUT_ERROR
        ├── ReferenceFrameError       REFERENCE_FRAME_ERROR
        ├── I2IPipelineError          I2I_PIPELINE_ERROR
        ├── ThumbnailError            THUMBNAIL_GENERATION_ERROR
        └── Cancelled                 CANCELLED

Messages never contain prompts, keys or signed URLs: they reach logs,
callbacks and Flower.
"""

from __future__ import annotations

from typing import Any, ClassVar


class OurvidzError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(OurvidzError):
    """The configuration (environment) is wrong; the message is one line."""


class FetchError(OurvidzError):
    """A reference image could not be used."""


class UnsafeReference(FetchError):
    """The reference URL is refused before any request: scheme or address."""


class ReferenceUnavailable(FetchError):
    """The reference is unreachable, missing, undecodable or over the size caps."""


class DeliveryError(OurvidzError):
    """Storage or the callback endpoint failed after every retry."""


class DeliveryRefused(DeliveryError):
    """The endpoint refused the request (4xx other than 408/429); retrying won't help."""


class JobError(OurvidzError):
    """Ends a job with a ``failed`` callback carrying ``code`` and ``retryable``."""

    code: ClassVar[str] = "WORKER_UNAVAILABLE"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        prefix = f"{self.code}: "
        message = message.removeprefix(prefix)
        # args carry the code too, so a caller without this module still sees it
        super().__init__(prefix + message)
        self.message = message
        self.field = field

    def as_dict(self) -> dict[str, Any]:
        """The callback's ``error`` object."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class InvalidJob(JobError):
    """The payload fails validation; the message names the field."""

    code = "INVALID_JOB"


class InvalidPrompt(JobError):
    """The prompt policy refused the final prompt."""

    code = "INVALID_PROMPT"


class OutOfMemory(JobError):
    """The device ran out of memory even after stepping down."""

    code = "OOM_ERROR"
    retryable = True


class ModelLoadError(JobError):
    """The model could not be loaded (or reloaded)."""

    code = "MODEL_LOAD_ERROR"
    retryable = True


class WorkerUnavailable(JobError):
    """No memory or dependency became available in time."""

    code = "WORKER_UNAVAILABLE"
    retryable = True


class JobTimeout(JobError):
    """The job ran past its time limit or arrived after its expiry."""

    code = "TIMEOUT_ERROR"


class ReferenceFrameError(JobError):
    """A WAN reference frame could not be used."""

    code = "REFERENCE_FRAME_ERROR"


class I2IPipelineError(JobError):
    """Image-to-image could not run (e.g. exact copy without a usable reference)."""

    code = "I2I_PIPELINE_ERROR"


class ThumbnailError(JobError):
    """A thumbnail could not be made; never fails a job on its own."""

    code = "THUMBNAIL_GENERATION_ERROR"


class Cancelled(JobError):
    """The job was revoked."""

    code = "CANCELLED"


#: Every wire code, for validation and docs.
ERROR_CODES: dict[str, type[JobError]] = {
    cls.code: cls
    for cls in (
        InvalidJob, InvalidPrompt, OutOfMemory, ModelLoadError, WorkerUnavailable,
        JobTimeout, ReferenceFrameError, I2IPipelineError, ThumbnailError, Cancelled,
    )
}
