"""The Flux gallery's FastAPI app, mounted by the api-server at ``/flux-gallery``.

Pages are server-rendered HTML (no script). Every route depends on Airflow's own auth: the
user comes from the API's JWT (``Authorization: Bearer`` header, or the ``_token`` cookie the
UI's login sets, so the page works inside the UI), and DAG routes require read access to the
DAG's runs and XComs through the configured auth manager (``requires_access_dag``, which takes
``dag_id`` from the path). Images are only served when they are listed in a manifest of the
very run in the URL, streamed from S3 or redirected to a short-lived presigned URL; the
bucket is never made public.

(No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at runtime.)
"""

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.configuration import conf
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, status
from fastapi.exceptions import HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from airflow_flux.plugins import pages
from airflow_flux.plugins.pages import Embed, dag_path, page_url
from airflow_flux.plugins.records import RunRecords
from airflow_flux.plugins.store import (
    IMAGE_TYPES,
    MAX_THUMBNAIL_SOURCE_BYTES,
    GalleryError,
    GalleryImage,
    GalleryStore,
    NoThumbnail,
    RunGallery,
    content_disposition,
)

SECTION = "flux_gallery"
RUNS_PER_PAGE = 10
THUMBS_PER_RUN = 8
#: Images of each DAG on the index: enough to recognise the job at a glance.
THUMBS_PER_DAG = 6
MAX_PAGE_SIZE = 200

# Images and prompts are task output: reading them needs the DAG's runs *and* its XComs (the
# manifest is found through an XCom), as the REST API would require for the same data.
_READ_RUN_IMAGES = [
    Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN)),
    Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.XCOM)),
]
_SHA256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the image (from its manifest)")]
#: Declared so the OpenAPI schema and validation know it; pages read it through :func:`pages.embed_of`.
_EMBED = Annotated[Embed | None, Query(description="inside Airflow's tabs: no page header, no links above the tab")]


def _store(request: Request) -> GalleryStore:
    return request.app.state.store


def _records(request: Request) -> RunRecords:
    return request.app.state.records


def _find(request: Request, session: Any, dag_id: str, run_id: str, sha256: str) -> tuple[GalleryImage, RunGallery]:
    """The stored image of the run's manifests with this digest (404 otherwise), and its run's gallery."""
    store = _store(request)
    refs = _records(request).manifest_refs(session, dag_id, [run_id]).get(run_id, [])
    gallery = store.run_gallery(run_id, refs)
    found = gallery.find(sha256)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such image in this run's manifests")
    return found, gallery


def _image_headers(etag: str) -> dict[str, str]:
    # Content-addressed: the digest is the validator, and the bytes behind a URL never change.
    return {"ETag": etag, "Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}


def _may_read_images(auth_manager: Any, user: Any, dag_id: str, session: Any) -> bool:
    """What ``_READ_RUN_IMAGES`` requires, for one DAG of the index (which lists DAGs by read only)."""
    from airflow.models.dag import DagModel

    # As requires_access_dag builds them (the DAG's team, where Airflow has teams).
    team_name = getattr(DagModel, "get_team_name", lambda *a, **kw: None)(dag_id, session=session)
    details = DagDetails(id=dag_id, team_name=team_name)
    return all(
        auth_manager.is_authorized_dag(method="GET", access_entity=entity, details=details, user=user)
        for entity in (DagAccessEntity.RUN, DagAccessEntity.XCOM)
    )


# -- pages -----------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/", response_class=HTMLResponse, summary="DAGs with images")
def index(request: Request, user: GetUserDep, session: SessionDep, embed: _EMBED = None) -> HTMLResponse:
    """The DAGs the user may read whose runs copied images to S3, with their latest images."""
    from airflow.api_fastapi.app import get_auth_manager

    store = _store(request)
    auth_manager = get_auth_manager()
    readable = auth_manager.get_authorized_dag_ids(user=user, method="GET", session=session)
    dags = _records(request).dags_with_images(session, readable)
    # The DB in this thread (a session is not shared across threads); manifests from S3 in parallel.
    latest: dict[str, list[tuple[str, Any]]] = {}
    for dag_id, _ in dags:
        if not _may_read_images(auth_manager, user, dag_id, session):
            continue  # listed, but its images and prompts need what the run pages need
        runs = _records(request).runs_with_images(session, dag_id, offset=0, limit=3)
        refs = _records(request).manifest_refs(session, dag_id, [r.run_id for r in runs])
        latest[dag_id] = [(r.run_id, refs[r.run_id]) for r in runs]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(dags)))) as pool:
        recent = dict(zip(latest, pool.map(lambda d: store.recent_runs(latest[d]), latest), strict=True))
    items = [
        {
            "dag_id": dag_id,
            "runs": runs,
            "url": page_url(request, dag_path(dag_id)),
            "thumbs": [pages.thumb(request, dag_id, i) for i in pages.stored(recent.get(dag_id, []), THUMBS_PER_DAG)],
            "costs": pages.run_costs(request, dag_id, recent.get(dag_id, [])),
            "hidden": dag_id not in recent,
        }
        for dag_id, runs in dags
    ]
    return pages.html(request, "index.html", {"dags": items, "crumbs": pages.crumbs(request)})


@router.get("/dags/{dag_id}", response_class=HTMLResponse, dependencies=_READ_RUN_IMAGES, summary="Latest runs")
def dag_page(
    request: Request,
    dag_id: str,
    session: SessionDep,
    page: Annotated[int, Query(ge=1)] = 1,
    embed: _EMBED = None,
) -> HTMLResponse:
    """The DAG's latest runs that copied images, with a strip of thumbnails each."""
    from airflow.models.dag import DagModel

    if session.get(DagModel, dag_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"DAG {dag_id!r} not found")
    store = _store(request)
    total = _records(request).count_runs_with_images(session, dag_id)
    count, offset, page = pages.pages(total, page, RUNS_PER_PAGE)
    runs = _records(request).runs_with_images(session, dag_id, offset=offset, limit=RUNS_PER_PAGE)
    refs = _records(request).manifest_refs(session, dag_id, [r.run_id for r in runs])
    # Manifests of several runs are read at once: the page waits for the slowest, not the sum.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(runs)))) as pool:
        galleries: list[RunGallery] = list(pool.map(lambda r: store.run_gallery(r.run_id, refs[r.run_id]), runs))
    items = []
    for run, gallery in zip(runs, galleries, strict=True):
        shown = [i for i in gallery.images if i.stored and i.sha256]
        items.append(
            {
                "run_id": run.run_id,
                "state": str(run.state or ""),
                "when": pages.when(run.run_after),
                "url": page_url(request, dag_path(dag_id, run.run_id)),
                "count": len(shown),
                "cost": pages.cost_label(gallery.cost_usd),
                "skipped": len(gallery.images) - len(shown),
                "errors": gallery.errors,
                "thumbs": [pages.thumb(request, dag_id, i) for i in shown[:THUMBS_PER_RUN]],
                "more": max(0, len(shown) - THUMBS_PER_RUN),
            }
        )
    context = {
        "dag_id": dag_id,
        "runs": items,
        "total": total,
        "first": offset + 1,
        "last": offset + len(items),
        "crumbs": pages.crumbs(request, dag_id),
        "urls": {"airflow_dag": pages.airflow_url("dags", dag_id)},
        **pages.pager(request, dag_path(dag_id), page, count),
    }
    return pages.html(request, "dag.html", context)


@router.get(
    "/dags/{dag_id}/runs/{run_id}",
    response_class=HTMLResponse,
    dependencies=_READ_RUN_IMAGES,
    summary="Images of a run",
)
def run_page(
    request: Request,
    dag_id: str,
    run_id: str,
    session: SessionDep,
    task_id: str | None = None,
    map_index: int | None = None,
    request_id: str | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE)] = None,
    embed: _EMBED = None,
) -> HTMLResponse:
    """Every image the run's copy tasks stored, optionally filtered on a task or a FLUX request."""
    from airflow.models.dagrun import DagRun

    run = session.execute(
        select(DagRun.run_id, DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
    ).first()
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Run {run_id!r} of DAG {dag_id!r} not found")
    store = _store(request)
    refs = _records(request).manifest_refs(session, dag_id, [run_id])[run_id]
    gallery = store.run_gallery(run_id, refs)
    size = per_page or int(request.app.state.page_size)
    page_query = {"per_page": per_page}

    filtered = task_id is not None or map_index is not None or request_id is not None
    # Numbered in the whole run, so "image 7" is the same image whatever the filter or page.
    numbered = [
        (n, i)
        for n, i in enumerate(gallery.images, start=1)
        if (task_id is None or i.ref.task_id == task_id)
        and (map_index is None or i.ref.map_index == map_index)
        and (request_id is None or str(i.entry.get("request_id") or "") == request_id)
    ]
    count, offset, page = pages.pages(len(numbered), page, size)
    shown = numbered[offset : offset + size]
    run_path = dag_path(dag_id, run_id)
    tasks = []
    for ref in refs:
        active = task_id == ref.task_id and (map_index is None or map_index == ref.map_index) and request_id is None
        map_query = ref.map_index if ref.map_index >= 0 else None
        tasks.append(
            {
                "label": ref.task_label,
                "active": active,
                "url": page_url(request, run_path, task_id=ref.task_id, map_index=map_query, **page_query),
            }
        )
    context = {
        "dag_id": dag_id,
        "run_id": run_id,
        "state": str(run.state or ""),
        "cards": [pages.card(request, dag_id, i, n) for n, i in shown],
        "total": len(numbered),
        "skipped": sum(not i.stored for _, i in numbered),
        "filtered": filtered,
        "request_id": request_id,
        "tasks": tasks,
        "errors": gallery.errors,
        "first": offset + 1,
        "last": offset + len(shown),
        "crumbs": pages.crumbs(request, dag_id, run_id),
        "urls": {
            "unfiltered": page_url(request, run_path, **page_query),
            "airflow_run": pages.airflow_url("dags", dag_id, "runs", run_id),
        },
        **pages.pager(
            request, run_path, page, count, task_id=task_id, map_index=map_index, request_id=request_id, **page_query
        ),
    }
    return pages.html(request, "run.html", context)


@router.get(
    "/dags/{dag_id}/runs/{run_id}/images/{sha256}/view",
    response_class=HTMLResponse,
    dependencies=_READ_RUN_IMAGES,
    summary="An image's page",
)
def image_page(
    request: Request, dag_id: str, run_id: str, sha256: _SHA256, session: SessionDep, embed: _EMBED = None
) -> HTMLResponse:
    """One image at a useful size with everything known about it, a download link and the way back."""
    image, gallery = _find(request, session, dag_id, run_id, sha256)
    stored = [i for i in gallery.images if i.stored and i.sha256]
    position = next(n for n, i in enumerate(stored) if i is image)
    number = gallery.images.index(image) + 1
    entry = image.entry
    neighbours = {
        "prev_url": pages.view_url(request, dag_id, stored[position - 1]) if position > 0 else None,
        "next_url": pages.view_url(request, dag_id, stored[position + 1]) if position + 1 < len(stored) else None,
    }
    context = {
        "dag_id": dag_id,
        "run_id": run_id,
        "c": pages.card(request, dag_id, image, number),
        "position": position + 1,
        "of": len(stored),
        "endpoint": str(entry.get("endpoint") or ""),
        "content_type": str(entry.get("content_type") or ""),
        "full_url": pages.image_url(request, dag_id, image),
        "download_url": pages.image_url(request, dag_id, image, download=1),
        "filename": image.filename,
        "inputs": [pages.input_view(request, dag_id, image, n, uri) for n, uri in enumerate(image.inputs)],
        "full": pages.frame(entry, box=1600),
        "crumbs": pages.crumbs(request, dag_id, run_id, here=f"image {number}"),
        "urls": {
            "run": page_url(request, dag_path(dag_id, run_id)),
            "airflow_run": pages.airflow_url("dags", dag_id, "runs", run_id),
        },
        **neighbours,
    }
    return pages.html(request, "image.html", context)


# -- bytes -----------------------------------------------------------------------------------------


@router.get(
    "/dags/{dag_id}/runs/{run_id}/images/{sha256}",
    dependencies=_READ_RUN_IMAGES,
    summary="One image of a run",
    response_class=Response,
    responses={200: {"content": {t: {} for t in IMAGE_TYPES}}, 307: {"description": "presigned S3 URL"}},
)
def image(
    request: Request,
    dag_id: str,
    run_id: str,
    sha256: _SHA256,
    session: SessionDep,
    size: Literal["full", "thumb"] = "full",
    download: bool = False,
) -> Response:
    """An image listed in one of the run's manifests (looked up by its SHA-256), or its thumbnail.

    ``download``: sent as an attachment named like its S3 object.
    """
    store = _store(request)
    found, _ = _find(request, session, dag_id, run_id, sha256)
    thumb = size == "thumb" and not download
    etag = f'"{sha256}{"-thumb" if thumb else ""}"'
    headers = _image_headers(etag)
    if download:
        headers["Content-Disposition"] = content_disposition(found.filename)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        # The manifest's size only spares a read when it already says too large; S3's own
        # length decides (store.thumbnail), and too large means the image itself is sent.
        source_size = found.entry.get("size")
        if thumb and not (isinstance(source_size, int) and source_size > MAX_THUMBNAIL_SOURCE_BYTES):
            with contextlib.suppress(NoThumbnail):
                data, content_type = store.thumbnail(found)
                return Response(data, media_type=content_type, headers=headers)
        if request.app.state.delivery == "presigned":
            url = store.presigned_url(found, download=download)
            return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
        chunks, obj = store.open_image(found)
    except GalleryError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"Image could not be read from S3: {exc}") from None
    content_type = str(obj.get("ContentType") or "")
    if content_type not in IMAGE_TYPES:
        # Whatever else a manifest may point at is never rendered by the browser (no stored XSS).
        content_type = "application/octet-stream"
        headers["Content-Disposition"] = content_disposition(found.filename)
    if obj.get("ContentLength") is not None:
        headers["Content-Length"] = str(obj["ContentLength"])
    return StreamingResponse(chunks, media_type=content_type, headers=headers)


@router.get(
    "/dags/{dag_id}/runs/{run_id}/images/{sha256}/inputs/{n}",
    dependencies=_READ_RUN_IMAGES,
    summary="A thumbnail of an edit's input image",
    response_class=Response,
)
def input_image(
    request: Request,
    dag_id: str,
    run_id: str,
    sha256: _SHA256,
    n: Annotated[int, Path(ge=0)],
    session: SessionDep,
) -> Response:
    """The ``n``-th input (from 0) of the edit that made this image, as a thumbnail.

    The input is named by the manifest, never by the URL, and read only when a task of the run
    named that object in its rendered fields.
    """
    found, _ = _find(request, session, dag_id, run_id, sha256)
    inputs = found.inputs
    if n >= len(inputs) or not inputs[n].startswith("s3://"):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such s3:// input for this image")
    store = _store(request)
    if not _records(request).names_input(session, dag_id, run_id, inputs[n]):
        # The manifest names it, the run's own record does not: never read on a manifest's word.
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No task of this run named this input")
    try:
        data, content_type = store.input_thumbnail(found, inputs[n])
    except GalleryError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"Input could not be read from S3: {exc}") from None
    headers = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
    return Response(data, media_type=content_type, headers=headers)


# -- errors ----------------------------------------------------------------------------------------

_TITLES = {
    401: ("Not logged in", "Log in to Airflow to see its images."),
    403: ("Not allowed", "You may not read this DAG's runs, so you cannot see their images."),
    404: ("Not found", "There is nothing here."),
}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Browsers get a readable page (with a login link on 401); API clients and images get JSON."""
    assert isinstance(exc, StarletteHTTPException)
    if "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    title, message = _TITLES.get(exc.status_code, ("Error", str(exc.detail)))
    if exc.status_code != status.HTTP_403_FORBIDDEN or exc.detail != "Forbidden":
        message = f"{message} ({exc.detail})" if exc.status_code in _TITLES else message
    login_url = None
    if exc.status_code == status.HTTP_401_UNAUTHORIZED:
        from airflow.api_fastapi.app import get_auth_manager

        login_url = get_auth_manager().get_url_login(next_url=str(request.url))
    context = {"status": exc.status_code, "title": title, "message": message, "login_url": login_url}
    response = pages.html(request, "error.html", context, status_code=exc.status_code)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


def create_app(
    *,
    delivery: str | None = None,
    presigned_expiry: int | None = None,
    default_conn_id: str | None = None,
    page_size: int | None = None,
) -> FastAPI:
    """Build the gallery app; settings default to the ``[flux_gallery]`` config section.

    :param delivery: ``stream`` (through the app) or ``presigned`` (redirect to a presigned S3 URL).
    :param presigned_expiry: lifetime of presigned URLs, seconds.
    :param default_conn_id: connection for copy tasks whose ``aws_conn_id`` is not on record.
    :param page_size: images per page.
    """
    delivery = delivery or conf.get(SECTION, "image_delivery", fallback="stream")
    if delivery not in ("stream", "presigned"):
        raise ValueError(f"[{SECTION}] image_delivery: must be 'stream' or 'presigned' (got {delivery!r})")
    app = FastAPI(
        title="Flux gallery",
        description="Images generated with FLUX and copied to S3 by FluxToS3Operator.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.delivery = delivery
    app.state.page_size = page_size or conf.getint(SECTION, "page_size", fallback=24)
    app.state.store = GalleryStore(
        presigned_expiry=presigned_expiry or conf.getint(SECTION, "presigned_expiry", fallback=300),
    )
    app.state.records = RunRecords(
        default_conn_id=default_conn_id or conf.get(SECTION, "aws_conn_id", fallback="aws_default")
    )
    app.include_router(router)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app
