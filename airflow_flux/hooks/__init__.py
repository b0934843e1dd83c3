"""Hooks of the airflow-flux provider."""

from __future__ import annotations

from airflow_flux.hooks.flux import FluxConnectionSettings, FluxHook
from airflow_flux.hooks.retry import RetryPolicy

__all__ = ["FluxConnectionSettings", "FluxHook", "RetryPolicy"]
