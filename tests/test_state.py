"""Task state on every Airflow 3: ``task_state_store`` where it exists (3.3), Airflow Variables before."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from airflow_flux import state
from airflow_flux.identity import STATE_KEY
from airflow_flux.state import VariableTaskState, forget_on_success, task_state, with_state_cleanup
from tests.helpers import task_states


def test_the_contexts_store_is_taken_at_its_word_else_variables_scoped_to_the_task():
    store = object()
    assert task_state({"task_state_store": store}) is store
    assert task_state({"task_state_store": None, "ti": SimpleNamespace()}) is None  # 3.3, no store: none
    ti = SimpleNamespace(dag_id="d", run_id="r", task_id="t", map_index=3)
    fallback = task_state({"ti": ti})
    assert isinstance(fallback, VariableTaskState)
    assert fallback.owner == ["d", "r", "t", 3]
    assert task_state({}) is None  # nothing to scope a record to
    # One Variable per task instance and key; another map index, run or task is another one.
    names = {
        VariableTaskState(dag_id="d", run_id=r, task_id=t, map_index=m).name(STATE_KEY)
        for r, t, m in [("r", "t", 3), ("r", "t", 4), ("r2", "t", 3), ("r", "t2", 3)]
    }
    assert len(names) == 4
    assert all(re.fullmatch(r"airflow_flux\.state\.[0-9a-f]{24}\.flux_request", n) for n in names)


def test_the_cleanup_callback_is_added_only_where_the_state_is_in_variables(monkeypatch):
    def mine(context):
        return None

    monkeypatch.setattr("airflow_flux.compat.HAS_TASK_STATE_STORE", True)
    assert with_state_cleanup(mine) is mine
    monkeypatch.setattr("airflow_flux.compat.HAS_TASK_STATE_STORE", False)
    assert with_state_cleanup(None) == [forget_on_success]
    assert with_state_cleanup(mine) == [mine, forget_on_success]
    assert with_state_cleanup([mine, forget_on_success]) == [mine, forget_on_success]  # not twice


def test_records_are_deleted_only_once_airflow_has_the_success(monkeypatch):
    deleted: list[str] = []
    monkeypatch.setattr("airflow.sdk.Variable.delete", classmethod(lambda cls, key: deleted.append(key)))
    task = SimpleNamespace(state_keys=lambda: [STATE_KEY])

    def context(recorded: str) -> dict:
        ti = SimpleNamespace(dag_id="d", run_id="r", task_id="t", map_index=2)
        ti.get_task_states = lambda **kw: {"r": {"t_2": recorded}}
        return {"ti": ti, "task": task}

    forget_on_success(context("failed"))  # the success report was refused: a retry needs the record
    assert deleted == []
    forget_on_success(context("success"))
    assert deleted == [VariableTaskState(dag_id="d", run_id="r", task_id="t", map_index=2).name(STATE_KEY)]


@pytest.mark.usefixtures("airflow_db")
def test_a_retry_reuses_the_request_recorded_in_a_variable_and_success_deletes_it(dags, flux_default, capfd):
    """A real run without ``task_state_store`` (as before Airflow 3.3): try 1 pays and dies, its
    retry reuses the request from the Variable, and the Variable is gone once the task succeeded."""
    from airflow.models.variable import Variable as VariableModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    dr = dags.get_dag("flux_test_retry_variable_state").test(run_conf={"prompt": "a fox kept in a variable"})
    assert dr.state == "success", task_states(dr)
    assert len(flux_default.calls(kind="submit")) == 1, "the retry paid for a second request"
    (request_id,) = flux_default.jobs
    out = capfd.readouterr().out
    assert re.search(
        rf"(Reconnecting to existing FLUX request {request_id} of try 1|{request_id} of try 1 already)", out
    )
    name = VariableTaskState(dag_id=dr.dag_id, run_id=dr.run_id, task_id="submit", map_index=-1).name(STATE_KEY)
    with create_session() as session:
        left = session.scalars(select(VariableModel.key).where(VariableModel.key.like(f"{state.VARIABLE_PREFIX}%")))
        assert name not in set(left), "the record outlived the task's success"
