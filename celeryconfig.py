"""Celery configuration of the ourvidz task cluster (CONTRACT.md section 1).

Read from the one settings object, so the environment of CONTRACT.md section 5
is the only place anything is configured.
"""

from kombu import Exchange, Queue

from ourvidz_tasks.settings import load_settings

_settings = load_settings()
QUEUES = ("sdxl", "chat", "wan", "outbox")

broker_url = _settings.broker_url
result_backend = _settings.backend
if _settings.broker_is_redis:
    # kombu's Redis transport, except that a list item that is not a Celery
    # envelope becomes a dead letter instead of killing the worker
    broker_transport = "ourvidz_tasks.guard:RedisTransport"
# a running job must never be handed out again while it runs: longer than the
# longest job plus the largest retry countdown (crash recovery uses leases)
broker_transport_options = {"visibility_timeout": _settings.visibility_timeout}
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout}
broker_connection_retry_on_startup = True

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
task_track_started = True
worker_send_task_events = True
task_send_sent_event = True
worker_consumer = "ourvidz_tasks.guard:Consumer"
worker_hijack_root_logger = True

# Exchange "" (the default exchange), routing key = queue name = Redis list key
_default = Exchange("", type="direct")
task_queues = tuple(Queue(name, _default, routing_key=name) for name in QUEUES)
task_routes = {f"ourvidz.{name}.*": {"queue": name, "exchange": "", "routing_key": name} for name in QUEUES}
task_default_queue = "chat"
task_default_exchange = "ourvidz"  # queues are bound here too; publishers use "" (the default exchange)
task_create_missing_queues = False

# where our own Redis bookkeeping lives (ledger, idempotency, dead letters)
ourvidz_redis_url = _settings.redis
worker_cancel_long_running_tasks_on_connection_loss = False  # a broker blip must not cancel the running job
