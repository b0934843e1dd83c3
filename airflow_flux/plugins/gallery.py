"""The Flux gallery plugin: a page of the Airflow UI showing the images ``FluxToS3Operator`` stored.

Registered through the package's ``airflow.plugins`` entry point, so installing the package
is enough. Every Airflow component loads plugins, but only the api-server mounts FastAPI
apps: the app (FastAPI, boto3, Pillow) is built on first access of :attr:`fastapi_apps`,
so the scheduler, triggerer and workers never import it.

What it adds to the UI:

* **Browse → Flux gallery**: the DAGs (that the user may read) whose runs stored images, with their latest images;
* an **Images** tab on DAG pages (its latest runs) and on DAG run pages (every image of the run);
  each image has its own page (prompt, seed, endpoint, cost, inputs, S3 URI, download);
* the app itself at ``/flux-gallery`` (see :mod:`airflow_flux.plugins.app`), also opened by
  the tasks' "Flux gallery" extra link (:class:`~airflow_flux.links.FluxGalleryLink`).

Settings (``[flux_gallery]`` section, or ``AIRFLOW__FLUX_GALLERY__...`` variables), read by the api-server:

* ``image_delivery``: ``stream`` (default: the app streams images from S3, which also works
  for an S3 endpoint the browser cannot reach, e.g. a local one) or ``presigned`` (full
  images redirect to a presigned S3 URL; the bucket stays private either way).
* ``presigned_expiry``: lifetime of presigned URLs, seconds (default 300).
* ``aws_conn_id``: connection used when a copy task's own one is unknown (default ``aws_default``).
* ``page_size``: images per page (default 24).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_flux.links.flux import URL_PREFIX, airflow_base_path


@cache
def _app() -> Any:
    from airflow_flux.plugins.app import create_app

    return create_app()


class FluxGalleryPlugin(AirflowPlugin):
    """The Flux gallery: a FastAPI app mounted by the api-server, and its entries in the UI."""

    name = "flux_gallery"

    def __init__(self) -> None:
        base = airflow_base_path() + URL_PREFIX
        # ``url_route`` makes the UI show the page in its own frame (same origin, so the user's
        # session cookie authenticates the gallery's requests); the UI fills in {DAG_ID}/{RUN_ID}.
        # ``embed`` names the tab's scope: the page drops its own header and the links above it.
        self.external_views = [
            {
                "name": "Flux gallery",
                "href": f"{base}/?embed=nav",
                "destination": "nav",
                "category": "browse",
                "url_route": "flux-gallery",
            },
            {
                "name": "Images",
                "href": f"{base}/dags/{{DAG_ID}}?embed=dag",
                "destination": "dag",
                "url_route": "flux-gallery-dag",
            },
            {
                "name": "Images",
                "href": f"{base}/dags/{{DAG_ID}}/runs/{{RUN_ID}}?embed=run",
                "destination": "dag_run",
                "url_route": "flux-gallery-run",
            },
        ]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The gallery app, built when the api-server asks for it (lazily: see the module docstring)."""
        return [{"app": _app(), "url_prefix": URL_PREFIX, "name": "Flux gallery"}]
