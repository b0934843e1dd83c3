"""The "Flux gallery" operator extra link, and the gallery's URLs.

Imported by the operators, so it must stay light: no FastAPI, boto3 or Pillow here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: Where the api-server mounts the gallery app (under ``[api] base_url``'s path).
URL_PREFIX = "/flux-gallery"


def airflow_base_path() -> str:
    """The path Airflow is served under (``[api] base_url``), without a trailing slash."""
    from airflow.sdk.configuration import conf

    base_url = conf.get("api", "base_url", fallback="") or ""
    return urlsplit(base_url).path.rstrip("/")


def gallery_path(
    dag_id: str | None = None, run_id: str | None = None, *, base_path: str | None = None, **filters: Any
) -> str:
    """The gallery's URL path (root-relative, so it works from the UI whatever its host).

    :param dag_id: the DAG's page; None for the gallery's index.
    :param run_id: the run's page (needs ``dag_id``).
    :param base_path: the path Airflow is served under; default from ``[api] base_url``.
    :param filters: query parameters (``task_id``, ``map_index``, ``request_id``, ``page``...);
        None values are left out.
    """
    path = (airflow_base_path() if base_path is None else base_path.rstrip("/")) + URL_PREFIX + "/"
    if dag_id:
        path += f"dags/{quote(dag_id, safe='')}"
        if run_id:
            path += f"/runs/{quote(run_id, safe='')}"
    query = urlencode({k: v for k, v in filters.items() if v is not None})
    return f"{path}?{query}" if query else path


class FluxGalleryLink(BaseOperatorLink):
    """Opens the Flux gallery on the images of this task.

    On ``FluxToS3Operator``: the images it copied (the run's gallery filtered on the task and
    map index). On the generate operator and the sensor: the images of their FLUX request
    (filtered on the request id of their result), once a copy task has stored them.
    """

    name = "Flux gallery"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """The gallery URL for ``ti_key`` (computed by the worker when the task ends, then kept in XCom).

        :param operator: the task.
        :param ti_key: the task instance.
        """
        map_index = ti_key.map_index if ti_key.map_index is not None and ti_key.map_index >= 0 else None
        from airflow_flux.transfers.flux_to_s3 import FluxToS3Operator  # here: that module imports this one

        if isinstance(operator, FluxToS3Operator):  # the images this very task copied
            return gallery_path(ti_key.dag_id, ti_key.run_id, task_id=ti_key.task_id, map_index=map_index)
        # The request's URL is pushed as soon as the task knows the request (before any
        # deferral; the result does not exist yet when Airflow asks for links at deferral,
        # and asking for a missing XCom logs an error): its last segment is the request id.
        from airflow.sdk.execution_time.xcom import XCom

        from airflow_flux.operators.flux import LINK_XCOM_KEY

        request_id = None
        try:
            url = XCom.get_value(ti_key=ti_key, key=LINK_XCOM_KEY)
            if isinstance(url, str) and url:
                request_id = url.rstrip("/").rsplit("/", 1)[-1]
        except Exception:  # no request known (the task failed before submitting): the whole run
            request_id = None
        return gallery_path(ti_key.dag_id, ti_key.run_id, request_id=request_id)
