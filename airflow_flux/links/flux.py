"""The "FLUX request" and "Flux gallery" extra links (pages of the Flux gallery), and its URLs.

Each operator lists the link class that fits it, so a link needs nothing from the operators:
it reads what the task pushed to XCom (keys in :mod:`airflow_flux.xcom_keys`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from airflow.sdk import BaseOperatorLink

from airflow_flux.xcom_keys import LINK_XCOM_KEY

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: Where the api-server mounts the gallery app (under ``[api] base_url``'s path).
URL_PREFIX = "/flux-gallery"


def airflow_base_path() -> str:
    """The path Airflow is served under (``[api] base_url``), without a trailing slash."""
    from airflow.providers.common.compat.sdk import conf

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


def gallery_image_path(
    dag_id: str, run_id: str, sha256: str, *, page: bool = True, base_path: str | None = None
) -> str:
    """The gallery's URL of one image of a run (by the SHA-256 its manifest records).

    :param dag_id: the DAG.
    :param run_id: the run.
    :param sha256: the image's digest.
    :param page: the image's page (details, download); False for the image itself
        (add ``?size=thumb`` for its thumbnail).
    :param base_path: the path Airflow is served under; default from ``[api] base_url``.
    """
    path = f"{gallery_path(dag_id, run_id, base_path=base_path)}/images/{sha256}"
    return f"{path}/view" if page else path


def _request_url(ti_key: TaskInstanceKey) -> str | None:
    """The request's URL the task pushed, or None (it failed before it knew its request)."""
    from airflow.sdk.execution_time.xcom import XCom

    try:
        url = XCom.get_value(ti_key=ti_key, key=LINK_XCOM_KEY)
    except Exception:
        return None
    return url if isinstance(url, str) and url else None


def _request_id(ti_key: TaskInstanceKey) -> str | None:
    """The id of the FLUX request the task pushed (the last segment of its URL), or None."""
    url = _request_url(ti_key)
    return url.rstrip("/").rsplit("/", 1)[-1] if url else None


class FluxRequestLink(BaseOperatorLink):
    """Opens the Flux gallery on the images of this task's FLUX request (submit, generate, sensor).

    A page a browser can open: the API's own URLs answer 401 without the token. Until a copy
    task has stored the request's images, the page says so.
    """

    name = "FLUX request"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """The gallery URL for ``ti_key`` (computed by the worker when the task ends, then kept in XCom).

        :param operator: the task.
        :param ti_key: the task instance.
        """
        # The request's URL is pushed as soon as the task knows the request (before any
        # deferral; the result does not exist yet when Airflow asks for links at deferral,
        # and asking for a missing XCom logs an error): its last segment is the request id.
        request_id = _request_id(ti_key)
        if request_id is None:
            return ""  # failed before it knew its request: no link rather than a page of nothing
        return gallery_path(ti_key.dag_id, ti_key.run_id, request_id=request_id)


class FluxGalleryLink(BaseOperatorLink):
    """Opens the Flux gallery on every image of this task's DAG run."""

    name = "Flux gallery"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """The run's gallery page.

        :param operator: the task.
        :param ti_key: the task instance.
        """
        return gallery_path(ti_key.dag_id, ti_key.run_id)


class FluxCopiedImagesLink(FluxGalleryLink):
    """Opens the Flux gallery on the images a ``FluxToS3Operator`` task copied (its task and map index)."""

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        map_index = ti_key.map_index if ti_key.map_index is not None and ti_key.map_index >= 0 else None
        return gallery_path(ti_key.dag_id, ti_key.run_id, task_id=ti_key.task_id, map_index=map_index)
