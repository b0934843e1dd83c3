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

import math
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.configuration import conf
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, status
from fastapi.exceptions import HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from airflow_flux.links.flux import airflow_base_path
from airflow_flux.plugins.store import IMAGE_TYPES, THUMB_SIZE, GalleryError, GalleryImage, GalleryStore, RunGallery

SECTION = "flux_gallery"
RUNS_PER_PAGE = 10
THUMBS_PER_RUN = 8
MAX_PAGE_SIZE = 200
#: Larger images get no thumbnail (decoding them would cost the api-server too much): the full image is sent.
MAX_THUMBNAIL_SOURCE_BYTES = 40 * 1024 * 1024

_templates = Environment(
    loader=FileSystemLoader(FilePath(__file__).with_name("templates")),
    autoescape=select_autoescape(["html"]),  # prompts are user text
    trim_blocks=True,
    lstrip_blocks=True,
)

# Images and prompts are task output: reading them needs the DAG's runs *and* its XComs (the
# manifest is found through an XCom), as the REST API would require for the same data.
_READ_RUN_IMAGES = [
    Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN)),
    Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.XCOM)),
]
_SHA256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the image (from its manifest)")]


# -- helpers ---------------------------------------------------------------------------------------


def _store(request: Request) -> GalleryStore:
    return request.app.state.store


def _page_size(request: Request) -> int:
    return int(request.app.state.page_size)


def _url(request: Request, path: str = "/", **query: Any) -> str:
    """A URL of this app (root-relative: under whatever prefix the api-server mounted it)."""
    url = request.scope.get("root_path", "").rstrip("/") + path
    params = urlencode({k: v for k, v in query.items() if v is not None})
    return f"{url}?{params}" if params else url


def _q(value: str) -> str:
    return quote(value, safe="")


def _airflow_url(*parts: str) -> str:
    """A page of the Airflow UI (``/dags/<dag>/runs/<run>/tasks/<task>``...)."""
    return airflow_base_path() + "/" + "/".join(_q(p) for p in parts)


def _html(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    body = _templates.get_template(template).render(**context)
    img_src = "'self' https: http:" if request.app.state.delivery == "presigned" else "'self'"
    return HTMLResponse(
        body,
        status_code=status_code,
        headers={
            # No script at all; images only from here (or S3, when presigned); framed only by the UI.
            "Content-Security-Policy": f"default-src 'none'; img-src {img_src}; style-src 'unsafe-inline'; "
            "frame-ancestors 'self'; base-uri 'none'; form-action 'self'",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )


def _pages(total: int, page: int, per_page: int) -> tuple[int, int, int]:
    """``(pages, offset, page)`` with ``page`` clamped to the last page."""
    pages = max(1, math.ceil(total / per_page))
    page = min(page, pages)
    return pages, (page - 1) * per_page, page


def _pager(request: Request, path: str, page: int, pages: int, **query: Any) -> dict[str, Any]:
    """Previous/next links of a paginated page at ``path`` (this app's, quoted), keeping ``query``."""
    return {
        "page": page,
        "pages": pages,
        "prev_url": _url(request, path, **query, page=page - 1) if page > 1 else None,
        "next_url": _url(request, path, **query, page=page + 1) if page < pages else None,
    }


def _bytes_label(size: Any) -> str:
    if not isinstance(size, int) or size <= 0:
        return ""
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def _image_url(request: Request, dag_id: str, image: GalleryImage, *, thumb: bool) -> str:
    path = f"/dags/{_q(dag_id)}/runs/{_q(image.ref.run_id)}/images/{image.sha256}"
    return _url(request, path, size="thumb" if thumb else None)


def _card(request: Request, dag_id: str, image: GalleryImage, per_page: int) -> dict[str, Any]:
    """What the run page shows of one image."""
    entry, ref = image.entry, image.ref
    width, height = entry.get("width"), entry.get("height")
    thumb_w = thumb_h = None
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        scale = min(1.0, THUMB_SIZE / max(width, height))
        thumb_w, thumb_h = max(1, round(width * scale)), max(1, round(height * scale))
    request_id = str(entry.get("request_id") or "")
    task_parts = ["dags", dag_id, "runs", ref.run_id, "tasks", ref.task_id]
    if ref.map_index >= 0:
        task_parts += ["mapped", str(ref.map_index)]
    stored = image.stored and image.sha256 is not None
    return {
        "stored": stored,
        "sha256": image.sha256,
        "s3_uri": f"s3://{image.bucket}/{image.key}" if stored else None,
        "thumb_url": _image_url(request, dag_id, image, thumb=True) if stored else None,
        "full_url": _image_url(request, dag_id, image, thumb=False) if stored else None,
        "thumb_w": thumb_w,
        "thumb_h": thumb_h,
        "prompt": str(entry.get("prompt") or ""),
        "seed": entry.get("seed"),
        "dims": f"{width}\u00d7{height}" if width and height else "size unknown",
        "bytes": _bytes_label(entry.get("size")),
        "nsfw": bool(entry.get("nsfw")),
        "reason": entry.get("reason"),
        "index": entry.get("index"),
        "request_id": request_id,
        "request_url": _url(
            request, f"/dags/{_q(dag_id)}/runs/{_q(ref.run_id)}", request_id=request_id, per_page=per_page
        ),
        "task_label": ref.task_label,
        "task_url": _airflow_url(*task_parts),
    }


# -- routes ----------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/", response_class=HTMLResponse, summary="DAGs with images")
def index(request: Request, user: GetUserDep, session: SessionDep) -> HTMLResponse:
    """The DAGs the user may read whose runs copied images to S3."""
    from airflow.api_fastapi.app import get_auth_manager

    readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET", session=session)
    dags = [
        {"dag_id": dag_id, "runs": runs, "url": _url(request, f"/dags/{_q(dag_id)}")}
        for dag_id, runs in _store(request).dags_with_images(session, readable)
    ]
    return _html(request, "index.html", {"dags": dags})


@router.get("/dags/{dag_id}", response_class=HTMLResponse, dependencies=_READ_RUN_IMAGES, summary="Latest runs")
def dag_page(
    request: Request,
    dag_id: str,
    session: SessionDep,
    page: Annotated[int, Query(ge=1)] = 1,
) -> HTMLResponse:
    """The DAG's latest runs that copied images, with a strip of thumbnails each."""
    from airflow.models.dag import DagModel

    if session.get(DagModel, dag_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"DAG {dag_id!r} not found")
    store = _store(request)
    total = store.count_runs_with_images(session, dag_id)
    pages, offset, page = _pages(total, page, RUNS_PER_PAGE)
    runs = store.runs_with_images(session, dag_id, offset=offset, limit=RUNS_PER_PAGE)
    refs = store.manifest_refs(session, dag_id, [r.run_id for r in runs])
    # Manifests of several runs are read at once: the page waits for the slowest, not the sum.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(runs)))) as pool:
        galleries: list[RunGallery] = list(pool.map(lambda r: store.run_gallery(r.run_id, refs[r.run_id]), runs))
    per_page = _page_size(request)
    items = []
    for run, gallery in zip(runs, galleries, strict=True):
        shown = [i for i in gallery.images if i.stored and i.sha256]
        run_url = _url(request, f"/dags/{_q(dag_id)}/runs/{_q(run.run_id)}")
        items.append(
            {
                "run_id": run.run_id,
                "state": str(run.state or ""),
                "when": _when(run.run_after),
                "url": run_url,
                "count": len(shown),
                "skipped": len(gallery.images) - len(shown),
                "errors": gallery.errors,
                "thumbs": [
                    {
                        "src": _image_url(request, dag_id, i, thumb=True),
                        "url": _url(
                            request,
                            f"/dags/{_q(dag_id)}/runs/{_q(run.run_id)}",
                            page=n // per_page + 1 if n >= per_page else None,
                        ),
                        "prompt": str(i.entry.get("prompt") or ""),
                        "nsfw": bool(i.entry.get("nsfw")),
                    }
                    for n, i in enumerate(shown[:THUMBS_PER_RUN])
                ],
                "more": max(0, len(shown) - THUMBS_PER_RUN),
            }
        )
    context = {
        "dag_id": dag_id,
        "runs": items,
        "total": total,
        "first": offset + 1,
        "last": offset + len(items),
        "urls": {"index": _url(request), "airflow_dag": _airflow_url("dags", dag_id)},
        **_pager(request, f"/dags/{_q(dag_id)}", page, pages),
    }
    return _html(request, "dag.html", context)


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
) -> HTMLResponse:
    """Every image the run's copy tasks stored, optionally filtered on a task or a FLUX request."""
    from airflow.models.dagrun import DagRun

    run = session.execute(
        select(DagRun.run_id, DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
    ).first()
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Run {run_id!r} of DAG {dag_id!r} not found")
    store = _store(request)
    refs = store.manifest_refs(session, dag_id, [run_id])[run_id]
    gallery = store.run_gallery(run_id, refs)
    size = per_page or _page_size(request)
    page_query = {"per_page": per_page}

    filtered = task_id is not None or map_index is not None or request_id is not None
    images = [
        i
        for i in gallery.images
        if (task_id is None or i.ref.task_id == task_id)
        and (map_index is None or i.ref.map_index == map_index)
        and (request_id is None or str(i.entry.get("request_id") or "") == request_id)
    ]
    pages, offset, page = _pages(len(images), page, size)
    shown = images[offset : offset + size]
    run_path = f"/dags/{_q(dag_id)}/runs/{_q(run_id)}"
    tasks = []
    for ref in refs:
        active = task_id == ref.task_id and (map_index is None or map_index == ref.map_index) and request_id is None
        tasks.append(
            {
                "label": ref.task_label,
                "active": active,
                "url": _url(
                    request,
                    run_path,
                    task_id=ref.task_id,
                    map_index=ref.map_index if ref.map_index >= 0 else None,
                    **page_query,
                ),
            }
        )
    context = {
        "dag_id": dag_id,
        "run_id": run_id,
        "state": str(run.state or ""),
        "cards": [_card(request, dag_id, i, size) for i in shown],
        "total": len(images),
        "skipped": sum(not i.stored for i in images),
        "filtered": filtered,
        "request_id": request_id,
        "tasks": tasks,
        "errors": gallery.errors,
        "first": offset + 1,
        "last": offset + len(shown),
        "urls": {
            "index": _url(request),
            "dag": _url(request, f"/dags/{_q(dag_id)}"),
            "unfiltered": _url(request, run_path, **page_query),
            "airflow_run": _airflow_url("dags", dag_id, "runs", run_id),
        },
        **_pager(
            request, run_path, page, pages, task_id=task_id, map_index=map_index, request_id=request_id, **page_query
        ),
    }
    return _html(request, "run.html", context)


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
) -> Response:
    """An image listed in one of the run's manifests (looked up by its SHA-256), or its thumbnail."""
    store = _store(request)
    refs = store.manifest_refs(session, dag_id, [run_id]).get(run_id, [])
    found = store.run_gallery(run_id, refs).find(sha256)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such image in this run's manifests")
    # Content-addressed: the digest is the validator, and the bytes behind a URL never change.
    etag = f'"{sha256}{"-thumb" if size == "thumb" else ""}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        source_size = found.entry.get("size")
        if size == "thumb" and not (isinstance(source_size, int) and source_size > MAX_THUMBNAIL_SOURCE_BYTES):
            data, content_type = store.thumbnail(found)
            return Response(data, media_type=content_type, headers=headers)
        if request.app.state.delivery == "presigned":
            return RedirectResponse(store.presigned_url(found), status_code=status.HTTP_307_TEMPORARY_REDIRECT)
        chunks, obj = store.open_image(found)
    except GalleryError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"Image could not be read from S3: {exc}") from None
    content_type = str(obj.get("ContentType") or "")
    if content_type not in IMAGE_TYPES:
        # Whatever else a manifest may point at is never rendered by the browser (no stored XSS).
        content_type = "application/octet-stream"
        headers["Content-Disposition"] = "attachment"
    if obj.get("ContentLength") is not None:
        headers["Content-Length"] = str(obj["ContentLength"])
    return StreamingResponse(chunks, media_type=content_type, headers=headers)


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
    response = _html(request, "error.html", context, status_code=exc.status_code)
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
        default_conn_id=default_conn_id or conf.get(SECTION, "aws_conn_id", fallback="aws_default"),
        presigned_expiry=presigned_expiry or conf.getint(SECTION, "presigned_expiry", fallback=300),
    )
    app.include_router(router)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app
