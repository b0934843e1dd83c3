"""What the gallery's pages show: URLs, breadcrumbs, frames and cards, rendered by Jinja templates.

Kept apart from the routes (:mod:`airflow_flux.plugins.app`) so each reads in one sitting: the
routes decide *what* a user may see; this module decides *how* it is laid out.

**Embedded mode.** Inside Airflow's own tabs the UI already shows where the user is, so the
page drops its title and the breadcrumbs above the tab's scope: the **Images** tab of a run
(``embed=run``) never links to the DAG's or the index's page, which would navigate inside the
tab. Every page link keeps ``embed``; links to Airflow's pages open in the top window.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import quote, urlencode

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from airflow_flux.links.flux import airflow_base_path
from airflow_flux.plugins.store import THUMB_SIZE

if TYPE_CHECKING:
    from datetime import datetime

    from fastapi import Request

    from airflow_flux.plugins.store import GalleryImage, RunGallery

Embed = Literal["nav", "dag", "run"]
#: How deep each embedded scope starts: crumbs above it are left out.
_SCOPE_DEPTH = {None: 0, "nav": 0, "dag": 1, "run": 2}

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(["html"]),  # prompts are user text
    trim_blocks=True,
    lstrip_blocks=True,
)


def q(value: str) -> str:
    """A path segment, quoted (run ids have ``:`` and ``+``)."""
    return quote(value, safe="")


def embed_of(request: Request) -> Embed | None:
    """The page's embedded scope (``?embed=``), or None for the stand-alone page."""
    value = request.query_params.get("embed")
    return value if value in get_args(Embed) else None  # type: ignore[return-value]


def raw_url(request: Request, path: str = "/", **query: Any) -> str:
    """A URL of this app (root-relative: under whatever prefix the api-server mounted it)."""
    url = request.scope.get("root_path", "").rstrip("/") + path
    params = urlencode({k: v for k, v in query.items() if v is not None})
    return f"{url}?{params}" if params else url


def page_url(request: Request, path: str = "/", **query: Any) -> str:
    """A link to another page of the gallery: as :func:`raw_url`, keeping the embedded scope."""
    return raw_url(request, path, **query, embed=embed_of(request))


def airflow_url(*parts: str) -> str:
    """A page of the Airflow UI (``/dags/<dag>/runs/<run>/tasks/<task>``...)."""
    return airflow_base_path() + "/" + "/".join(q(p) for p in parts)


def dag_path(dag_id: str, run_id: str | None = None) -> str:
    return f"/dags/{q(dag_id)}" + (f"/runs/{q(run_id)}" if run_id else "")


def crumbs(
    request: Request, dag_id: str | None = None, run_id: str | None = None, here: str | None = None
) -> list[dict[str, str | None]]:
    """``[{label, url}]`` from the index down to the current page (whose url is None).

    :param dag_id: the DAG, on its pages and below.
    :param run_id: the run, on its pages and below.
    :param here: the label of a page below the run (an image).
    """
    trail: list[tuple[str, str]] = [("All DAGs", page_url(request))]
    if dag_id:
        trail.append((dag_id, page_url(request, dag_path(dag_id))))
    if dag_id and run_id:
        trail.append((run_id, page_url(request, dag_path(dag_id, run_id))))
    if here:
        trail.append((here, ""))
    items: list[dict[str, str | None]] = [
        {"label": label, "url": url} for label, url in trail[_SCOPE_DEPTH[embed_of(request)] :]
    ]
    if items:
        items[-1]["url"] = None
    return items


def html(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    """Render ``template``; headers allow no script, and framing only by the Airflow UI."""
    body = _templates.get_template(template).render(embed=embed_of(request), **context)
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


def pages(total: int, page: int, per_page: int) -> tuple[int, int, int]:
    """``(pages, offset, page)`` with ``page`` clamped to the last page."""
    count = max(1, math.ceil(total / per_page))
    page = min(page, count)
    return count, (page - 1) * per_page, page


def pager(request: Request, path: str, page: int, count: int, **query: Any) -> dict[str, Any]:
    """Previous/next links of a paginated page at ``path`` (this app's, quoted), keeping ``query``."""
    return {
        "page": page,
        "pages": count,
        "prev_url": page_url(request, path, **query, page=page - 1) if page > 1 else None,
        "next_url": page_url(request, path, **query, page=page + 1) if page < count else None,
    }


def bytes_label(size: Any) -> str:
    if not isinstance(size, int) or size <= 0:
        return ""
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def frame(entry: dict[str, Any], box: int = THUMB_SIZE) -> dict[str, Any]:
    """The image's own proportions, so frames neither crop nor pad it.

    ``ratio`` is a CSS ``aspect-ratio``; ``w``/``h`` are the image scaled to fit ``box`` (the
    thumbnail's size), given to ``<img>`` so the page does not jump while images load.
    """
    width, height = entry.get("width"), entry.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        return {"ratio": "1 / 1", "w": None, "h": None, "known": False}
    scale = min(1.0, box / max(width, height))
    return {
        "ratio": f"{width} / {height}",
        "w": max(1, round(width * scale)),
        "h": max(1, round(height * scale)),
        "known": True,
    }


def image_url(request: Request, dag_id: str, image: GalleryImage, *, thumb: bool = False, **query: Any) -> str:
    """The bytes of a stored image (``thumb``: its thumbnail)."""
    path = f"{dag_path(dag_id, image.ref.run_id)}/images/{image.sha256}"
    return raw_url(request, path, size="thumb" if thumb else None, **query)


def view_url(request: Request, dag_id: str, image: GalleryImage) -> str:
    """The image's own page."""
    return page_url(request, f"{dag_path(dag_id, image.ref.run_id)}/images/{image.sha256}/view")


def task_url(dag_id: str, image: GalleryImage) -> str:
    """The Airflow page of the copy task (instance) that stored the image."""
    ref = image.ref
    parts = ["dags", dag_id, "runs", ref.run_id, "tasks", ref.task_id]
    if ref.map_index >= 0:
        parts += ["mapped", str(ref.map_index)]
    return airflow_url(*parts)


def cost_label(value: Any) -> str:
    return f"${value:.3f}".rstrip("0").rstrip(".") if isinstance(value, int | float) else ""


def stored(galleries: list[RunGallery], limit: int) -> list[GalleryImage]:
    """The first ``limit`` stored images of ``galleries`` (runs, latest first)."""
    return [i for g in galleries for i in g.images if i.stored and i.sha256][:limit]


def run_costs(request: Request, dag_id: str, galleries: list[RunGallery]) -> dict[str, Any]:
    """Each recent run's cost (a link to it) and their total, for the index."""
    known = [g.cost_usd for g in galleries if g.cost_usd is not None]
    return {
        "runs": [
            {"run_id": g.run_id, "url": page_url(request, dag_path(dag_id, g.run_id)), "cost": cost_label(g.cost_usd)}
            for g in galleries
        ],
        "total": cost_label(round(sum(known), 6)) if known else "",
    }


def thumb(request: Request, dag_id: str, image: GalleryImage) -> dict[str, Any]:
    """A thumbnail in a strip (index and DAG pages): it opens the image's page."""
    prompt = str(image.entry.get("prompt") or "")
    return {
        "src": image_url(request, dag_id, image, thumb=True),
        "url": view_url(request, dag_id, image),
        "prompt": prompt,
        "nsfw": bool(image.entry.get("nsfw")),
        "frame": frame(image.entry),
    }


def card(request: Request, dag_id: str, image: GalleryImage, number: int) -> dict[str, Any]:
    """What the run page shows of one image.

    :param number: its place in the run's images, from 1 (manifest keys are unchanged).
    """
    entry = image.entry
    width, height = entry.get("width"), entry.get("height")
    request_id = str(entry.get("request_id") or "")
    index = entry.get("index")
    stored = image.stored and image.sha256 is not None
    return {
        "number": number,
        "stored": stored,
        "sha256": image.sha256,
        "s3_uri": f"s3://{image.bucket}/{image.key}" if stored else None,
        "thumb_url": image_url(request, dag_id, image, thumb=True) if stored else None,
        "view_url": view_url(request, dag_id, image) if stored else None,
        "frame": frame(entry),
        "prompt": str(entry.get("prompt") or ""),
        "seed": entry.get("seed"),
        "dims": f"{width}\u00d7{height}" if width and height else "size unknown",
        "bytes": bytes_label(entry.get("size")),
        "nsfw": bool(entry.get("nsfw")),
        "reason": entry.get("reason"),
        "status": str(entry.get("status") or ""),
        # Shown from 1, as people count; the key and the manifest keep fal's 0-based index.
        "image_no": index + 1 if isinstance(index, int) else None,
        "request_id": request_id,
        "request_url": page_url(request, dag_path(dag_id, image.ref.run_id), request_id=request_id)
        if request_id
        else None,
        "task_label": image.ref.task_label,
        "task_url": task_url(dag_id, image),
        "cost": cost_label(entry.get("cost_usd")),
    }


def input_view(request: Request, dag_id: str, image: GalleryImage, n: int, uri: str) -> dict[str, Any]:
    """One input image of an edit: an ``s3://`` one gets a thumbnail served by the app; others a label."""
    if uri.startswith("s3://"):
        path = f"{dag_path(dag_id, image.ref.run_id)}/images/{image.sha256}/inputs/{n}"
        return {"uri": uri, "src": raw_url(request, path), "link": None}
    if uri.startswith(("https://", "http://")):
        return {"uri": uri, "src": None, "link": uri}
    return {"uri": uri, "src": None, "link": None}  # a data: URI, recorded as its type, size and digest
