"""Apache Airflow provider for FLUX.1 Kontext [pro] image generation on fal's queue API.

Importing this package is deliberately cheap: nothing here imports Airflow, boto3,
aiohttp or Pillow, so DAG files that use the provider parse fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
