"""Transfers of the airflow-flux provider."""

from __future__ import annotations

from airflow_flux.transfers.flux_to_s3 import FluxToS3Operator

__all__ = ["FluxToS3Operator"]
