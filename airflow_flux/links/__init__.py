"""Operator extra links of the airflow-flux provider, and the Flux gallery's URLs.

Imported by the operators, so it stays light: no FastAPI, boto3 or Pillow here.
"""

from __future__ import annotations

from airflow_flux.links.flux import (
    FluxCopiedImagesLink,
    FluxGalleryLink,
    FluxRequestLink,
    gallery_image_path,
    gallery_path,
)

__all__ = ["FluxCopiedImagesLink", "FluxGalleryLink", "FluxRequestLink", "gallery_image_path", "gallery_path"]
