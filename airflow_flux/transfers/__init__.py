"""Transfers of the airflow-flux provider."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_flux.transfers.flux_to_s3 import FluxToS3Operator

if TYPE_CHECKING:
    from airflow_flux.transfers.publish import PublishResult, publish_images, read_manifest, review_images

__all__ = ["FluxToS3Operator", "PublishResult", "publish_images", "read_manifest", "review_images"]

#: The publish step's names, imported when first used: a DAG file that only copies (most of
#: them) does not pay for the publish module at every parse.
_PUBLISH = frozenset({"PublishResult", "publish_images", "read_manifest", "review_images"})


def __getattr__(name: str) -> Any:
    if name in _PUBLISH:
        from airflow_flux.transfers import publish

        return getattr(publish, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
