"""One typed settings object, read from the environment (CONTRACT.md section 5).

Contract names keep their exact spelling (``SUPABASE_URL``...); everything else
is ``OURVIDZ_*``. Build it once at start-up with :func:`load_settings` and pass
it on; a wrong value raises :class:`~ourvidz_tasks.contract.errors.ConfigError` whose
message is one line naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .devices import canonical_device
from .errors import ConfigError
from .names import POD_PROGRAMS

_BROKER_SCHEMES = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp")
#: the most retries a generation task takes (``runtime.tasks.JobTask.max_retries``)
MAX_TASK_RETRIES = 3


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ourvidz_tasks"


class Settings(BaseSettings):
    """Everything a worker, publisher or tool needs, typed and checked."""

    # empty values mean unset (compose writes ``${X:-}`` as an empty string)
    model_config = SettingsConfigDict(env_prefix="OURVIDZ_", extra="ignore", frozen=True, env_ignore_empty=True)

    # -- TLS of the broker and Redis (declared before the URLs: their validator reads them)
    #: CA bundle that signs the servers' certificates (default: the system store)
    broker_ssl_ca: Path | None = None
    #: client certificate and key, for servers that require mutual TLS
    broker_ssl_cert: Path | None = None
    broker_ssl_key: Path | None = None
    #: certificate verification of TLS connections (``rediss://``, ``amqps://``)
    broker_ssl_verify: Literal["required", "optional", "none"] = "required"

    # -- wire contract --------------------------------------------------------
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    redis_url: str | None = None
    legacy_redis_url: str | None = None
    #: the sentinel group (primary) name that ``sentinel://`` URLs resolve (docs/brokers.md)
    sentinel_master: str = Field("mymaster", min_length=1)
    #: the sentinels' own password (``requirepass`` of ``redis-server --sentinel``), if any
    sentinel_password: SecretStr | None = None
    #: RabbitMQ: ``quorum`` declares the queues as quorum queues (replicated; docs/brokers.md)
    amqp_queue_type: Literal["classic", "quorum"] = "classic"
    supabase_url: str | None = Field(None, validation_alias="SUPABASE_URL")
    supabase_service_key: SecretStr | None = Field(None, validation_alias="SUPABASE_SERVICE_KEY")
    job_callback_secret: SecretStr | None = Field(None, validation_alias="JOB_CALLBACK_SECRET")
    flower_basic_auth: SecretStr | None = Field(None, validation_alias="FLOWER_BASIC_AUTH")
    model_source: Literal["tiny", "local"] = "local"
    sdxl_model: Path | None = None
    sdxl_config: Path | None = None
    wan_model: Path | None = None
    qwen_instruct_model: Path | None = None
    qwen_base_model: Path | None = None
    device: str | None = None
    vram_budget_mb: int | None = Field(None, gt=0)
    fetch_allow: Annotated[tuple[str, ...], NoDecode] = ()

    # -- ours -----------------------------------------------------------------
    #: where tiny models are built once and cached
    tiny_cache: Path = Field(default_factory=lambda: _default_cache() / "tiny")
    #: where outputs wait on local disk until uploaded
    spool_dir: Path = Field(default_factory=lambda: _default_cache() / "spool")
    #: torch intra-op threads; default: cores divided by the local pools (3)
    torch_threads: int | None = Field(None, gt=0)
    #: timeout of every HTTP call to storage/callbacks, seconds
    http_timeout: float = Field(30.0, gt=0)
    #: tries per upload/callback (network errors and 5xx), with backoff
    http_tries: int = Field(3, ge=1, le=10)
    #: first backoff between HTTP tries, seconds (doubles each try)
    http_backoff: float = Field(0.5, ge=0)
    #: reference image fetch caps
    fetch_timeout: float = Field(15.0, gt=0)
    fetch_max_bytes: int = Field(20 * 1024 * 1024, gt=0)
    fetch_max_pixels: int = Field(40_000_000, gt=0)
    fetch_max_redirects: int = Field(3, ge=0)
    #: minimum seconds between two progress callbacks of one job
    progress_interval: float = Field(2.0, ge=0)
    #: live previews in the progress callbacks (a small WEBP of the latents, docs/edge.md); off with 0
    previews: bool = True
    #: denoising steps between two previews; 0: about every 20% of the job's steps
    preview_every: int = Field(0, ge=0)
    #: the most previews one job uploads (one storage key per job, overwritten)
    preview_max: int = Field(5, ge=1, le=100)
    #: remove the job's preview from storage when the job ends (else the last one stays)
    preview_remove: bool = False
    #: SDXL's tiny preview decoder: a diffusers ``AutoencoderTiny`` folder (the taesdxl layout);
    #: unset with local models: no SDXL previews (one warning)
    sdxl_preview_model: Path | None = None
    #: WAN's tiny preview decoder: the published TAEHV ``taew2_1`` weights (``.pth`` or
    #: ``.safetensors``); unset with local models: no WAN previews (one warning)
    wan_preview_model: Path | None = None
    #: size caps on untrusted text
    max_prompt_chars: int = Field(8000, gt=0)
    max_message_chars: int = Field(32000, gt=0)
    max_messages: int = Field(200, gt=0)
    #: dotted path ``module:callable`` of the prompt policy
    prompt_policy: str = "ourvidz_tasks.services.policy:default_policy"
    #: file holding the default enhancement system prompt (else the built-in one)
    enhance_system_prompt_file: Path | None = None
    #: load the Qwen base model at start (``start``) or on first use
    qwen_base_load: Literal["start", "first_use"] = "first_use"
    #: WAN checkpoint kind when loading local weights: vace conditions on frames, t2v cannot
    wan_kind: Literal["auto", "vace", "t2v"] = "auto"
    #: PNG zlib level: 1 is ~5x faster than 6 for a few % more bytes
    png_compress_level: int = Field(1, ge=0, le=9)
    #: seconds a result (which may hold prompts) stays in the result backend
    result_expires: int = Field(3600, gt=0)
    #: the longest job any pool may run, seconds (drives visibility_timeout)
    max_job_seconds: int = Field(3600, gt=0)
    #: the largest retry countdown, seconds
    max_retry_countdown: int = Field(600, gt=0)
    #: seconds a terminal record keeps a job id from being run twice
    idempotency_ttl: int = Field(7 * 24 * 3600, gt=0)
    #: Prometheus endpoint of a worker: this port plus its role offset (sdxl +0, chat +1, wan +2,
    #: outbox +3; +4 per GPU index above 0); unset: none
    metrics_port: int | None = Field(None, ge=0, le=65535)
    #: address the metrics endpoint binds (0.0.0.0 in containers)
    metrics_address: str = "127.0.0.1"
    #: seconds without a job after which a pool releases its models (JSON map; WAN loads on demand)
    idle_unload_seconds: dict[str, float] = Field(default_factory=lambda: {"wan": 300.0})
    #: per-job-type time limits in seconds (JSON map over the defaults; the solo pool ignores Celery's)
    time_limits: dict[str, float] = Field(default_factory=dict)
    #: seconds a job of each family's default shape takes before any job was measured (JSON map over
    #: the defaults of ``services.durations``; other shapes scale by their work units); a measured
    #: duration replaces it (queue ETAs, the fair order's costs)
    job_seconds: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    #: a job shape's duration is the mean of its last this many measured jobs
    duration_window: int = Field(20, ge=1, le=1000)
    #: ``module:callable`` plug-ins, comma-separated, each called once with the worker's Runtime at
    #: start (they may add attempt hooks around model calls: tracing, fault injection in tests)
    runtime_plugins: Annotated[tuple[str, ...], NoDecode] = ()
    #: ``module:callable`` plug-ins of ``bin/bridge``, each called once with the Bridge at start (they may add step hooks)
    bridge_plugins: Annotated[tuple[str, ...], NoDecode] = ()
    #: seconds a model load waits for GPU memory before WORKER_UNAVAILABLE (retried)
    memory_wait: float = Field(600.0, gt=0)
    #: seconds a model waiting for GPU memory waits before pools with queued work of their own are asked
    #: to unload too (before that only idle pools with nothing queued are): switches stay rare
    memory_patience: float = Field(30.0, gt=0)
    #: the default budget (no ``vram_budget_mb``) is the card minus this per pool (its CUDA context)...
    cuda_context_mb: int = Field(768, ge=0)
    #: ...minus this safety margin
    memory_margin_mb: int = Field(1024, ge=0)
    #: allocator slack a reservation adds to weights + working memory (a fraction)
    memory_slack: float = Field(0.05, ge=0, le=1)
    #: working memory per job shape is the largest of the last this many measurements (it can go down)
    memory_window: int = Field(5, ge=1, le=100)
    #: cap each CUDA pool at its reservation (``torch.cuda.set_per_process_memory_fraction``)
    memory_cap: bool = False
    #: how pools send callbacks: ``outbox`` = at once, what fails goes to the durable outbox in Redis
    #: (drained by the pools, or ``bin/worker outbox`` when one runs); ``inline`` = at once with
    #: retries, what fails is kept for ``ourvidz replay`` only
    callbacks: Literal["outbox", "inline"] = "outbox"
    #: seconds a pool waits on one callback before handing it to the outbox (outbox mode)
    callback_timeout: float = Field(2.0, gt=0)
    #: the longest pause between two delivery tries of the outbox while the edge is down
    outbox_max_pause: float = Field(10.0, gt=0)
    #: a ``bin/worker outbox`` consumer is part of this deployment: report it when missing or stuck
    outbox_consumer: bool = False
    #: seconds a dead worker's heartbeat takes to expire; its job is requeued soon after
    lease_seconds: float = Field(15.0, ge=1)
    #: seconds a starting pool retries its warmup while Redis does not answer, then it exits 69
    #: (its supervisor restarts it); it consumes nothing before it is warm
    startup_wait: float = Field(300.0, gt=0)
    #: seconds a running job waits for Redis (broker and bookkeeping) through an outage before its
    #: message is handed back; an outage never counts against a job's attempts
    broker_patience: float = Field(300.0, gt=0)
    #: pools serve each family queue in a fair order across users, weighted by GPU-seconds
    #: (``services.fairness``; Redis brokers); off: first in, first out
    fair_order: bool = True
    #: users' weights in the fair order: ``tier=weight`` pairs (a user's tier from ``ourvidz tier``,
    #: unknown tiers weigh 1) or a ``module:callable`` taking a user id and returning a weight
    fair_weights: str = ""
    #: deliveries of one job attempt before it is given up as poison (it kills its worker)
    max_deliveries: int = Field(3, ge=1)
    #: node name override (tests); default ``{family}@{hostname}``
    hostname: str | None = None

    # -- one pod: ``bin/worker all`` (tools/supervise.py, docs/operators.md) -----
    #: the programs the pod supervises: pools and optional ``outbox``, ``flower``, ``metrics``
    pod: Annotated[tuple[str, ...], NoDecode] = ("sdxl", "chat", "wan")
    #: where the pod writes its supervisord config and socket (default: a fresh temporary folder)
    pod_dir: Path | None = None
    #: seconds a program must stay up to count as started (sooner exits are start failures)
    pod_start_seconds: float = Field(30.0, gt=0)
    #: start failures of one program, with supervisord's backoff, before the pod gives up (exit 1)
    pod_start_retries: int = Field(3, ge=0)
    #: crashes of one running program within ``pod_crash_window`` seconds that make the pod exit 1
    pod_crash_limit: int = Field(5, ge=1)
    pod_crash_window: float = Field(300.0, gt=0)
    #: seconds SIGTERM lets running jobs finish before the pools are killed (the pod's drain bound)
    drain_seconds: float = Field(600.0, gt=0)

    # -- per-type defaults (a job's own values win) ----------------------------
    sdxl_fast_steps: int = Field(15, ge=1, le=150)
    sdxl_high_steps: int = Field(25, ge=1, le=150)
    sdxl_guidance: float = Field(7.5, ge=0, le=30)
    sdxl_denoise: float = Field(0.15, ge=0, le=1)
    wan_fast_steps: int = Field(25, ge=1, le=150)
    wan_high_steps: int = Field(50, ge=1, le=150)
    wan_guidance: float = Field(5.0, ge=0, le=30)
    wan_width: int = Field(480, ge=16)
    wan_height: int = Field(832, ge=16)
    wan_frames: int = Field(83, ge=1, le=83)
    wan_fps: int = Field(16, ge=8, le=24)
    #: WAN flow shift by size when a job has no ``config.sample_shift`` (JSON map ``"WxH"`` -> shift,
    #: either orientation, ``"*"`` for the rest); the old system ran 5.0 at 480x832
    wan_shift: dict[str, Annotated[float, Field(gt=0, le=50)]] = Field(default_factory=lambda: {"*": 5.0})
    #: default model and budget of an enhancement without ``metadata.enhance``
    enhance_model: Literal["qwen_instruct", "qwen_base"] = "qwen_instruct"
    enhance_max_tokens: int = Field(200, ge=1, le=2048)
    enhance_temperature: float = Field(0.7, ge=0, le=2)
    #: top_p of an enhancement whose ``metadata.enhance`` names none
    enhance_top_p: float = Field(0.9, gt=0, le=1)

    # -- the chat pool's engine (README "Chat at scale") -----------------------
    #: requests decoded together on the one model (the worker runs twice as many threads,
    #: so up to this many more wait inside the pool, enhancements first)
    chat_concurrency: int = Field(8, ge=1, le=256)
    #: tokens the preallocated KV cache holds for all running requests together; the ledger
    #: reserves its bytes with the weights, and a request needing more is INVALID_JOB
    chat_cache_tokens: int = Field(16384, ge=64)
    #: an OpenAI-compatible server (vLLM, SGLang) that answers the chat tasks instead of an
    #: in-process model, e.g. ``http://127.0.0.1:8000``
    chat_server_url: str | None = None
    #: the server's model name for each of ours (JSON map; default: our names)
    chat_server_models: dict[str, str] = Field(default_factory=dict)
    #: the GPU memory the server holds, reserved in this pool's ledger while it is in use
    chat_server_memory_mb: int = Field(0, ge=0)
    #: seconds one request to the server may take
    chat_server_timeout: float = Field(600.0, gt=0)

    @field_validator("fetch_allow", "runtime_plugins", "bridge_plugins", "pod", mode="before")
    @classmethod
    def _split_allow(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("fetch_allow")
    @classmethod
    def _check_allow(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{entry!r} is neither a host nor a CIDR") from None
        return value

    @field_validator("pod")
    @classmethod
    def _check_pod(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in POD_PROGRAMS]
        if unknown or not value:
            raise ValueError(f"names programs of {', '.join(POD_PROGRAMS)}, got {', '.join(unknown) or 'none'}")
        return tuple(dict.fromkeys(value))

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        # one spelling per device (``cuda`` -> ``cuda:0``, ``cpu:0`` -> ``cpu``): one ledger per card
        return None if value is None else canonical_device(value)

    @field_validator("broker_url", "result_backend", "redis_url", "legacy_redis_url", "supabase_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not urlsplit(value).scheme:
            raise ValueError("must be a URL with a scheme")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in _BROKER_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(_BROKER_SCHEMES)}, got {scheme!r}")
        return value

    @field_validator("broker_url", "result_backend", "redis_url", "legacy_redis_url")
    @classmethod
    def _tls_params(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A ``rediss://`` URL gets the TLS settings as query parameters (those in the URL win).

        kombu, Celery's Redis backend and redis-py all read them from the URL, and with
        them kombu uses TLS even under our own transport class.
        """
        if value is None or urlsplit(value).scheme != "rediss":
            return value
        parts = urlsplit(value)
        query = parse_qsl(parts.query, keep_blank_values=True)
        present = {key for key, _ in query}
        wanted = {"ssl_cert_reqs": info.data.get("broker_ssl_verify", "required"),
                  "ssl_ca_certs": info.data.get("broker_ssl_ca"), "ssl_certfile": info.data.get("broker_ssl_cert"),
                  "ssl_keyfile": info.data.get("broker_ssl_key")}
        query += [(key, str(v)) for key, v in wanted.items() if v is not None and key not in present]
        return urlunsplit(parts._replace(query=urlencode(query)))

    # -- derived --------------------------------------------------------------
    @property
    def broker_is_redis(self) -> bool:
        return urlsplit(self.broker_url).scheme in ("redis", "rediss", "sentinel")

    @property
    def fair_url(self) -> str:
        """The Redis holding the queues' fair order (``services.fairness``): the broker on Redis
        brokers; on RabbitMQ the store, where the pools relay each queue through it."""
        return self.broker_url if self.broker_is_redis else self.redis

    @property
    def fair_relay(self) -> bool:
        """Pools relay the family queues through the fair order on RabbitMQ (``services.fair_relay``) and
        consume the ready queues (:func:`~ourvidz_tasks.contract.names.ready_queue`)."""
        return self.fair_order and not self.broker_is_redis

    @property
    def redis(self) -> str:
        """The Redis of the ledger, idempotency records, outbox and dead letters."""
        if self.redis_url:
            return self.redis_url
        return self.broker_url if self.broker_is_redis else "redis://127.0.0.1:6379/0"

    @property
    def backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        return self.broker_url if self.broker_is_redis else self.redis

    @property
    def legacy_redis(self) -> str:
        return self.legacy_redis_url or self.redis

    @property
    def visibility_timeout(self) -> int:
        """Longer than the longest job plus the largest retry countdown."""
        return self.max_job_seconds + self.max_retry_countdown + 600

    @property
    def terminal_ttl(self) -> int:
        """Seconds a terminal record lives: ``idempotency_ttl``, but never less than
        ``visibility_timeout`` plus every retry's largest countdown (a redelivered or
        retried job must still find it)."""
        return max(self.idempotency_ttl, self.visibility_timeout + MAX_TASK_RETRIES * self.max_retry_countdown)

    def require_delivery(self) -> tuple[str, str]:
        """``(SUPABASE_URL, SUPABASE_SERVICE_KEY)`` or a ConfigError."""
        if not self.supabase_url:
            raise ConfigError("SUPABASE_URL is not set")
        if self.supabase_service_key is None or not self.supabase_service_key.get_secret_value():
            raise ConfigError("SUPABASE_SERVICE_KEY is not set")
        return self.supabase_url.rstrip("/"), self.supabase_service_key.get_secret_value()


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a bad value is a one-line :class:`ConfigError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        env = _env_name(name)
        raise ConfigError(f"{env}: {first['msg']}") from None


def _env_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"OURVIDZ_{field.upper()}"
