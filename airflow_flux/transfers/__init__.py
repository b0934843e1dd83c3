"""Transfers of the airflow-flux provider."""

from __future__ import annotations

from airflow_flux.transfers.flux_to_s3 import FluxToS3Operator
from airflow_flux.transfers.publish import PublishResult, publish_images, read_manifest, review_images

__all__ = ["FluxToS3Operator", "PublishResult", "publish_images", "read_manifest", "review_images"]
