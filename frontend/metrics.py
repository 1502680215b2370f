"""Prometheus metrics of the front end (GET /metrics). One registry per app, so tests can build many."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from frontend.protocol import TaskStatus

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TASK_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Gauge("wan_frontend_tasks", "Task records by state", ["state"], registry=self.registry)
        self.queue_length = Gauge("wan_frontend_queue_length", "Tasks waiting for a slot", registry=self.registry)
        self.running = Gauge("wan_frontend_running_tasks", "Tasks being generated", registry=self.registry)
        self.step_seconds = Histogram("wan_frontend_step_seconds", "Time between two denoising-step responses",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.task_seconds = Histogram("wan_frontend_task_duration_seconds",
                                      "Time from start to end of a task, by outcome", ["outcome"],
                                      buckets=TASK_BUCKETS, registry=self.registry)
        self.rejected = Counter("wan_frontend_rejected_total", "POSTs turned away, by reason", ["reason"],
                                registry=self.registry)
        self.triton_ready = Gauge("wan_frontend_triton_ready", "1 when Triton and the pipeline model are ready",
                                  registry=self.registry)
        for state in TaskStatus:
            self.tasks.labels(state.value)

    def set_counts(self, counts: dict[TaskStatus, int]) -> None:
        for state in TaskStatus:
            self.tasks.labels(state.value).set(counts.get(state, 0))

    def transition(self, old: TaskStatus | None, new: TaskStatus) -> None:
        if old is not None:
            self.tasks.labels(old.value).dec()
        self.tasks.labels(new.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
