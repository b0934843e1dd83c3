"""Sensors of the airflow-flux provider."""

from __future__ import annotations

from airflow_flux.sensors.flux import FluxStatusSensor

__all__ = ["FluxStatusSensor"]
