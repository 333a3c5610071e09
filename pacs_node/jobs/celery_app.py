"""The Celery side of the job queue shared by the node (which publishes) and ``pacs-node worker``
(which consumes): the app's settings, the task's name and the broker queues.

A task carries only a job id; the catalog holds everything else and says whether the job still
waits (see :mod:`pacs_node.catalog.jobs`), so the broker may lose, repeat or delay a task
without harm. There is no result backend: a job's outcome is its row. Tasks are acknowledged
after they ran (``acks_late``) and handed back when their worker process dies
(``task_reject_on_worker_lost``); each worker process reserves one task at a time (prefetch
multiplier 1), so a long job never holds others back. The broker must not hand a task to
another worker while the first still runs it: Redis's visibility timeout is set to twice
``job_timeout_s``. RabbitMQ's consumer timeout is the broker's own setting (``consumer_timeout``
in rabbitmq.conf, or a policy): a queue argument for it is ignored before RabbitMQ 3.12 and,
changed later, makes the queue's next declaration fail, so queues are declared without one.

Queues: one per device class, ``<job_queue_prefix><class>``; a bundle names its class in its
metadata (``pacs_node.queue``, "cpu" by default), so GPU hosts run ``pacs-node worker --queues
gpu`` and take only the models that need one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu import Exchange, Queue

from pacs_node.config import NodeOptions
from pacs_node.inference.queues import DEFAULT_QUEUE

TASK_NAME = "pacs_node.run_job"
CONNECT_TIMEOUT_S = 4.0  # a broker that does not answer within this is unreachable


def redelivery_s(options: NodeOptions) -> float:
    """How long Redis waits for a taken task's acknowledgement before handing it again (a
    RabbitMQ broker's ``consumer_timeout`` should be at least this)."""
    return 2 * options.job_timeout_s


def is_amqp(options: NodeOptions) -> bool:
    return urlsplit(options.broker_url).scheme in ("amqp", "amqps", "pyamqp")


def broker_queue(options: NodeOptions, device_class: str = DEFAULT_QUEUE) -> Queue:
    """The broker queue of one device class, declared alike by publisher and workers (RabbitMQ
    refuses a queue declared again with other arguments)."""
    name = f"{options.job_queue_prefix}{device_class}"
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)


def make_app(options: NodeOptions) -> Celery:
    """A Celery app on the node's broker, configured as the module docstring says."""
    app = Celery("pacs_node", broker=options.broker_url, set_as_current=False)
    transport: dict[str, Any] = {}
    if not is_amqp(options):
        transport = {
            "visibility_timeout": int(redelivery_s(options)),
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
        }
    app.conf.update(
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        # a task that raised after its claim is the catalog's business (the job failed or its
        # lease runs out); one that could not claim raises Reject and goes back to the queue
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=f"{options.job_queue_prefix}{DEFAULT_QUEUE}",
        task_create_missing_queues=False,
        broker_transport_options=transport,
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    return app
