"""Where a task keeps what it paid for, so that its retry does not pay again: on every Airflow 3.

Airflow 3.3 gives each task instance ``context["task_state_store"]``: a small JSON store in
the metadata DB that survives retries and a lost worker, written through the execution API.
Before 3.3 there is none, and XCom is no substitute (a task's XComs are cleared when its
next try starts). There, :func:`task_state` returns :class:`VariableTaskState`: the same
``get``/``set`` on Airflow **Variables**, one per task instance and key.

Why Variables, and not an object store next to the outputs (as the common-ai provider's
``LLMBatchOperator`` keeps ``_airflow_batch_state/``):

- they are the metadata DB behind a supported Task SDK API (``airflow.sdk.Variable``) on
  every Airflow 3 release: written by the worker through the execution API before the
  submit returns to the operator, they survive retries, worker loss and a new worker host,
  exactly as ``task_state_store`` does;
- a submit has no bucket of its own (``FluxSubmitOperator`` only knows the API): an object
  store would need a new setting on every deployment before the first safe retry, and
  credentials for it in every worker;
- the record holds a request handle and fingerprint, no secret (the token is never stored).

What it costs: one Variable per task instance (per request in a batch), named
``airflow_flux.state.<digest>.<key>`` (the digest of DAG, run, task and map index), visible
to whoever may read Variables. A task deletes its own once Airflow has recorded its success
(:func:`forget_on_success`, an ``on_success_callback`` the operators add), since no retry
follows a success and a clear starts fresh; failed tasks' records stay until a later try
succeeds. ``Variable.get`` asks the
secrets backends first, as for any Variable.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from airflow.sdk import Context

log = logging.getLogger(__name__)

#: Prefix of the Variables that hold task state where Airflow has no ``task_state_store``.
VARIABLE_PREFIX = "airflow_flux.state."


class TaskState(Protocol):
    """What the operators need of a task's state: ``task_state_store``'s ``get`` and ``set``."""

    def get(self, key: str) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...


class VariableTaskState:
    """``task_state_store`` on Airflow Variables, for one task instance (Airflow before 3.3).

    :param dag_id: the task's DAG.
    :param run_id: its run.
    :param task_id: the task.
    :param map_index: its map index (-1 when not mapped).
    """

    def __init__(self, *, dag_id: str, run_id: str, task_id: str, map_index: int) -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index = dag_id, run_id, task_id, map_index
        digest = hashlib.sha256(json.dumps(self.owner).encode()).hexdigest()[:24]
        self.prefix = f"{VARIABLE_PREFIX}{digest}."

    @property
    def owner(self) -> list[str | int]:
        """The task instance, as stored with each value (and hashed into the Variable's name)."""
        return [self.dag_id, self.run_id, self.task_id, self.map_index]

    def name(self, key: str) -> str:
        """The Variable that holds ``key``."""
        return self.prefix + key

    def get(self, key: str) -> Any:
        from airflow.sdk import Variable

        stored = Variable.get(self.name(key), default=None, deserialize_json=True)
        # The owner is stored with the value: a digest collision (or a hand-made Variable of
        # that name) is never taken for this task's record.
        if isinstance(stored, dict) and stored.get("owner") == self.owner:
            return stored.get("value")
        return None

    def set(self, key: str, value: Any) -> None:
        from airflow.sdk import Variable

        Variable.set(
            self.name(key),
            {"owner": self.owner, "value": value},
            description=f"airflow-flux task state of {'/'.join(map(str, self.owner))} (deleted when it has succeeded)",
            serialize_json=True,
        )

    def forget(self, keys: Iterable[str]) -> None:
        """Delete the records of ``keys``: the task succeeded, no retry will read them.

        :param keys: the keys the task may have written.
        """
        from airflow.sdk import Variable

        for key in keys:
            try:
                Variable.delete(self.name(key))
            except Exception:  # a leftover record costs a row, never a payment
                log.warning("Could not delete the task state Variable %s", self.name(key), exc_info=True)


def task_state(context: Context | Mapping[str, Any]) -> TaskState | None:
    """The task's state store: ``task_state_store`` where Airflow has one (3.3), else Variables.

    A context that names ``task_state_store`` (3.3 always does) is taken at its word, None
    included. Otherwise the task instance's Variables are used; None when there is no task
    instance to scope them to.

    :param context: the task's context.
    """
    if "task_state_store" in context:
        return context["task_state_store"]
    ti = context.get("ti")
    dag_id, run_id, task_id, map_index = (getattr(ti, n, None) for n in ("dag_id", "run_id", "task_id", "map_index"))
    if not (isinstance(dag_id, str) and isinstance(run_id, str) and isinstance(task_id, str)):
        return None
    return VariableTaskState(
        dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index if isinstance(map_index, int) else -1
    )


def forget_on_success(context: Context | Mapping[str, Any]) -> None:
    """An ``on_success_callback``: delete the task's Variables once Airflow has its success.

    Before Airflow 3.3 only (``task_state_store`` keys expire on their own). It runs after the
    worker reported the success, and deletes only when the metadata DB says ``success``: a
    task whose report was refused (say, failed meanwhile by the scheduler) keeps its record,
    so its retry still reuses the request. Which keys: the task's ``state_keys()``.

    :param context: the task's context.
    """
    store = task_state(context)
    task, ti = context.get("task"), context.get("ti")
    state_keys = getattr(task, "state_keys", None)
    get_states = getattr(ti, "get_task_states", None)
    if not isinstance(store, VariableTaskState) or state_keys is None or get_states is None:
        return
    run_id, task_id, map_index = store.run_id, store.task_id, store.map_index
    try:
        states = get_states(dag_id=store.dag_id, task_ids=[task_id], run_ids=[run_id], map_index=map_index)
    except Exception:
        log.warning("Could not confirm this task's success; its state Variables are kept", exc_info=True)
        return
    name = task_id if map_index < 0 else f"{task_id}_{map_index}"
    if (states or {}).get(run_id, {}).get(name) != "success":
        log.warning("This task is not recorded as succeeded; its state Variables are kept for a retry")
        return
    store.forget(state_keys())


def with_state_cleanup(callbacks: Any) -> Any:
    """``callbacks`` (an ``on_success_callback`` value) with :func:`forget_on_success` added,
    where the task state lives in Variables (Airflow before 3.3).

    :param callbacks: None, a callable or a list of them, as the user gave it.
    """
    from airflow_flux.compat import HAS_TASK_STATE_STORE

    if HAS_TASK_STATE_STORE:
        return callbacks
    listed = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    return [*listed, forget_on_success] if forget_on_success not in listed else listed
