"""Celery configuration of the ourvidz task cluster (CONTRACT.md section 1).

Read from the one settings object, so the environment of CONTRACT.md section 5
is the only place anything is configured.
"""

from kombu import Exchange, Queue

from ourvidz_tasks.contract.names import FAMILIES, QUEUES, ready_queue
from ourvidz_tasks.contract.names import route_pattern as _route_pattern
from ourvidz_tasks.contract.settings import load_settings

_settings = load_settings()

broker_url = _settings.broker_url
result_backend = _settings.backend
_sentinel = _settings.broker_url.startswith("sentinel://")
if _settings.broker_is_redis:
    # kombu's Redis transport, except that a list item that is not a Celery
    # envelope becomes a dead letter instead of killing the worker
    broker_transport = f"ourvidz_tasks.services.guard:{'Sentinel' if _sentinel else 'Redis'}Transport"
# a running job must never be handed out again while it runs: longer than the
# longest job plus the largest retry countdown (crash recovery uses leases)
broker_transport_options: dict[str, object] = {"visibility_timeout": _settings.visibility_timeout}
result_backend_transport_options: dict[str, object] = {"visibility_timeout": _settings.visibility_timeout}
# sentinel:// URLs (docs/brokers.md): the primary of this group, asked of the sentinels
_group: dict[str, object] = {"master_name": _settings.sentinel_master}
if _settings.sentinel_password is not None:
    _group["sentinel_kwargs"] = {"password": _settings.sentinel_password.get_secret_value()}
if _sentinel:
    broker_transport_options.update(_group)
if _settings.backend.startswith("sentinel://"):
    result_backend_transport_options.update(_group)
broker_connection_retry_on_startup = True
# a failover (docs/brokers.md, Redis Sentinel) leaves seconds without a writable primary: storing a state
# and publishing a retry or a chain's next task wait it out (with backoff) rather than fail the job
result_backend_always_retry = True
result_backend_max_retries = 40
result_backend_base_sleep_between_retries_ms = 50
result_backend_max_sleep_between_retries_ms = 2000
task_publish_retry_policy = {"max_retries": 60, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}
if _settings.backend.startswith("sentinel://"):
    # Celery's Sentinel backend on connections that count NOREPLICAS & co. as connection errors (retried)
    result_backend = f"ourvidz_tasks.services.result_backend:SentinelBackend+{_settings.backend}"

task_protocol = 2
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
result_expires = _settings.result_expires
result_extended = False

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# STARTED is stored by our tasks themselves (BaseTask.mark_started), a job task's only after its
# processing callback is on its way: Celery's own would cost two round trips before every job
task_track_started = False
worker_send_task_events = True
task_send_sent_event = True
worker_consumer = "ourvidz_tasks.services.guard:Consumer"
worker_hijack_root_logger = True

# Exchange "" (the default exchange), routing key = queue name = Redis list key
_default = Exchange("", type="direct")
# RabbitMQ with the fair order on: the pools consume each family's ready queue (services.fair_relay)
_CONSUMED = (*QUEUES, *(ready_queue(family) for family in FAMILIES)) if _settings.fair_relay else QUEUES
task_queues = tuple(Queue(name, _default, routing_key=name) for name in _CONSUMED)
task_routes = {_route_pattern(name): {"queue": name, "exchange": "", "routing_key": name} for name in QUEUES}
task_default_queue = "chat"
task_default_exchange = "ourvidz"  # queues are bound here too; publishers use "" (the default exchange)
if _settings.amqp_queue_type == "quorum" and not _settings.broker_is_redis:
    # RabbitMQ quorum queues (docs/brokers.md): replicated, no global QoS (Celery detects the
    # x-queue-type and uses per-consumer QoS), countdown retries through Celery's native delayed
    # delivery, which needs a topic exchange (publishers may still use "" + the queue name).
    # RabbitMQ gives a message up after x-delivery-limit redeliveries: above the poison guard's
    # count, so the guard still ends a poison job with a ``failed`` callback.
    _topic = Exchange("ourvidz", type="topic")
    _quorum = {"x-queue-type": "quorum", "x-delivery-limit": _settings.max_deliveries + 2}
    task_queues = tuple(Queue(name, _topic, routing_key=name, queue_arguments=_quorum) for name in _CONSUMED)
    task_routes = {_route_pattern(name): {"queue": name, "exchange": "ourvidz", "routing_key": name}
                   for name in QUEUES}
    task_default_exchange_type = "topic"
    task_default_queue_type = "quorum"
    broker_transport_options["confirm_publish"] = True  # a publish is done when the quorum has it
task_create_missing_queues = False

# where our own Redis bookkeeping lives (ledger, idempotency, dead letters)
ourvidz_redis_url = _settings.redis
worker_cancel_long_running_tasks_on_connection_loss = False  # a broker blip must not cancel the running job
