"""Operators of the airflow-flux provider."""

from __future__ import annotations

from airflow_flux.links import FluxRequestLink
from airflow_flux.operators.batch import FluxBatchGenerateOperator
from airflow_flux.operators.flux import FluxGenerateOperator, FluxSubmitOperator

__all__ = ["FluxBatchGenerateOperator", "FluxGenerateOperator", "FluxRequestLink", "FluxSubmitOperator"]
