"""Triggers of the airflow-flux provider (run in the triggerer)."""

from __future__ import annotations

from airflow_flux.triggers.batch import FluxBatchTrigger
from airflow_flux.triggers.flux import FluxStatusTrigger

__all__ = ["FluxBatchTrigger", "FluxStatusTrigger"]
