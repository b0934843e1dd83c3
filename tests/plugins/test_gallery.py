"""The Flux gallery on a real api-server: plugin, extra links, auth, pages, bytes, and a real browser.

Runs of ``flux_test_to_s3`` are made with ``dag.test()`` (emulator + moto S3); an
``airflow api-server`` subprocess (simple auth manager: admin, alice who may read the DAG,
bob who may not) serves them (see ``conftest.py``). Headless Chromium then opens the page
the task's extra link points at, as a logged-in user (the UI's ``_token`` cookie), and the
test checks every image rendered and that the bytes the browser got are the bytes in S3.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import time
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import pytest
import requests

from tests.plugins.cdp import Chromium
from tests.plugins.conftest import DAG_ID, EDIT_DAG_ID, EDIT_INPUT, GalleryEnv

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(300)


class _Cards(HTMLParser):
    """The image cards of a gallery page: each figure's data attributes, its <img> and links."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, Any]] = []
        self.links: list[dict[str, str]] = []
        self.images: list[dict[str, str]] = []
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "img":
            self.images.append(a)
        if tag == "figure" and "card" in a.get("class", ""):
            self.cards.append(
                {
                    "class": a.get("class", ""),
                    "sha256": a.get("data-sha256"),
                    "number": a.get("data-number"),
                    "img": None,
                    "full": None,
                    "frame": None,
                }
            )
        elif tag == "img" and self.cards:
            self.cards[-1]["img"] = a
        elif tag == "a":
            self.links.append(a)
            if self.cards and "pic" in a.get("class", ""):
                self.cards[-1]["full"] = a["href"]  # the image's own page
                self.cards[-1]["frame"] = a.get("style", "")


def _cards(html: str) -> _Cards:
    parser = _Cards()
    parser.feed(html)
    return parser


def _image_page(env: GalleryEnv, url: str, user: str = "alice") -> dict[str, Any]:
    """An image's page: its text, the full image's URL, the download link, the other links."""
    resp = env.get(url, user)
    assert resp.status_code == 200, (url, resp.status_code, resp.text[:300])
    parsed = _cards(resp.text)
    (full,) = [i for i in parsed.images if "size=thumb" not in i["src"] and "/inputs/" not in i["src"]]
    (download,) = [a for a in parsed.links if "download" in a]
    return {"html": resp.text, "src": full["src"], "download": download, "links": parsed.links, "parsed": parsed}


def _ratio(style: str) -> float:
    """The ``aspect-ratio: W / H`` of an inline style, as W/H."""
    (w, h) = re.search(r"aspect-ratio:\s*(\d+)\s*/\s*(\d+)", style).groups()  # type: ignore[union-attr]
    return int(w) / int(h)


def _s3_bytes(env: GalleryEnv, key: str) -> bytes:
    return env.s3.get_object(Bucket=env.bucket, Key=key)["Body"].read()


def test_plugin_is_registered_and_tasks_link_to_their_images(gallery_env: GalleryEnv) -> None:
    env = gallery_env
    plugins = env.get("/api/v2/plugins", "admin").json()["plugins"]
    (plugin,) = [p for p in plugins if p["name"] == "flux_gallery"]
    assert plugin["source"].startswith("airflow-flux==")  # the package's entry point, no copied file
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/flux-gallery"]
    views = {v["destination"]: v for v in plugin["external_views"]}
    assert views["nav"]["href"] == "/flux-gallery/?embed=nav" and views["nav"]["category"] == "browse"
    assert views["dag"]["href"] == "/flux-gallery/dags/{DAG_ID}?embed=dag"
    assert views["dag_run"]["href"] == "/flux-gallery/dags/{DAG_ID}/runs/{RUN_ID}?embed=run"
    assert env.get("/api/v2/importErrors", "admin").json()["total_entries"] == 0

    run_id = env.runs["foxes"]
    base = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"
    to_s3 = env.get(f"{base}/to_s3/links", "admin").json()["extra_links"]
    wait = env.get(f"{base}/wait/links", "admin").json()["extra_links"]
    manifest = env.manifest("foxes")
    (request_id,) = {i["request_id"] for i in manifest["images"]}
    run_page = f"/flux-gallery/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
    assert to_s3["Flux gallery"] == f"{run_page}?task_id=to_s3"
    # The request link opens the gallery on that request (the API's URL would answer 401 in a
    # browser); the gallery link, the whole run.
    assert wait["FLUX request"] == f"{run_page}?request_id={request_id}"
    assert wait["Flux gallery"] == run_page
    page = env.get(wait["FLUX request"], "alice")
    assert page.status_code == 200 and len(_cards(page.text).cards) == 4


def test_auth_is_airflows(gallery_env: GalleryEnv) -> None:
    env = gallery_env
    run_id = env.runs["foxes"]
    sha = env.manifest("foxes")["images"][0]["sha256"]
    paths = [
        f"/flux-gallery/dags/{DAG_ID}",
        f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}",
        f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}/images/{sha}",
        f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}/images/{sha}?size=thumb",
    ]
    for path in paths:
        assert env.get(path).status_code == 401, path  # no token, no cookie
        assert env.get(path, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403, path
        assert env.get(path, "bob").status_code == 403, path  # a viewer of another team: not this DAG
        assert env.get(path, cookies={"_token": env.tokens["bob"]}).status_code == 403, path
        assert env.get(path, "alice").status_code == 200, path
        assert env.get(path, cookies={"_token": env.tokens["alice"]}).status_code == 200, path  # the UI's cookie
    # The index lists only the DAGs the user may read.
    assert DAG_ID in env.get("/flux-gallery/", "alice").text
    assert DAG_ID not in env.get("/flux-gallery/", "bob").text
    # A browser that is not logged in gets a page with a way to log in (still a 401).
    page = env.get(paths[1], headers={"Accept": "text/html"})
    assert page.status_code == 401 and "/auth/login?next=" in page.text
    assert env.get("/flux-gallery/", headers={"Accept": "text/html"}).status_code == 401


def test_pages_list_every_image_and_serve_the_bytes_in_s3(gallery_env: GalleryEnv) -> None:
    env = gallery_env
    run_id = env.runs["foxes"]
    manifest = env.manifest("foxes")
    stored = {i["sha256"]: i for i in manifest["images"] if i["status"] == "copied"}
    assert len(stored) == 4

    page = env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}", "alice")
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # no script at all (default-src 'none')
    cards = _cards(page.text).cards
    assert [c["sha256"] for c in cards] == [i["sha256"] for i in manifest["images"]]
    assert [c["number"] for c in cards] == ["1", "2", "3", "4"]  # people count from 1
    for card in cards:
        entry = stored[card["sha256"]]
        assert ("nsfw" in card["class"]) == entry["nsfw"]
        assert card["img"]["loading"] == "lazy"
        src = _image_page(env, card["full"])["src"]
        full = env.get(src, "alice")
        assert full.headers["content-type"] == "image/jpeg"
        # The bytes served are the object in S3, whose digest the manifest recorded.
        assert hashlib.sha256(full.content).hexdigest() == entry["sha256"]
        assert full.content == _s3_bytes(env, entry["key"])
        assert full.headers["etag"] == f'"{entry["sha256"]}"'
        assert src.endswith(f"/images/{entry['sha256']}")
        assert env.get(src, "alice", headers={"If-None-Match": full.headers["etag"]}).status_code == 304
        thumb = env.get(card["img"]["src"], "alice")
        assert thumb.headers["content-type"] == "image/jpeg" and 0 < len(thumb.content) < len(full.content)
    for text in ("gallery foxes", f"{manifest['images'][0]['seed']}", "1024\u00d71024", "flagged", ">to_s3<"):
        assert text in page.text, text

    # Pagination: 4 images, 3 per page.
    first = env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}?per_page=3", "alice").text
    assert len(_cards(first).cards) == 3 and "page 1 of 2" in first
    (next_link,) = {a["href"] for a in _cards(first).links if a.get("rel") == "next"}  # pager above and below
    second = env.get(next_link, "alice").text
    assert [c["sha256"] for c in _cards(second).cards] == [manifest["images"][3]["sha256"]]

    # Filtered on the FLUX request (the sensor's link), on a task, and nothing for another task.
    request_id = manifest["images"][0]["request_id"]
    by_request = env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}?request_id={request_id}", "alice").text
    assert len(_cards(by_request).cards) == 4
    assert not _cards(env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}?task_id=other", "alice").text).cards

    # The second run: one image stored, one skipped as NSFW (listed, no picture).
    owls = env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{env.runs['owls']}", "alice").text
    owl_cards = _cards(owls).cards
    assert [c["img"] is not None for c in owl_cards] == [True, False]
    assert "Not stored: flagged NSFW" in owls

    # The DAG's page: its latest runs first, with their thumbnails.
    dag_page = env.get(f"/flux-gallery/dags/{DAG_ID}", "alice").text
    assert dag_page.index(env.runs["owls"]) < dag_page.index(env.runs["foxes"])
    sections = {
        run: next(s for s in dag_page.split('<section class="run">') if quote(env.runs[run], safe="") in s)
        for run in ("foxes", "owls", "wide")
    }  # (other tests' runs of this DAG may be listed too)
    assert {run: len(re.findall(r'<img src="[^"]+size=thumb"', s)) for run, s in sections.items()} == {
        "foxes": 4,
        "owls": 1,
        "wide": 2,
    }

    # Only images of the run's manifests are served: another digest, or another run's image, is a 404.
    assert env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}/images/{'0' * 64}", "alice").status_code == 404
    owl_sha = next(c["sha256"] for c in owl_cards if c["img"])
    assert env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}/images/{owl_sha}", "alice").status_code == 404
    assert env.get(f"/flux-gallery/dags/{DAG_ID}/runs/no_such_run", "alice").status_code == 404


def test_frames_follow_each_images_own_aspect_ratio(gallery_env: GalleryEnv) -> None:
    """16:9 images get 16:9 frames (no crop, no bands) on the run, DAG and index pages; squares stay square."""
    from PIL import Image

    env = gallery_env
    for run, expected in (("wide", 1392 / 752), ("foxes", 1.0)):
        manifest = env.manifest(run)
        entry = manifest["images"][0]
        assert entry["width"] / entry["height"] == pytest.approx(expected)
        cards = _cards(env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{env.runs[run]}", "alice").text).cards
        for card in cards:
            assert _ratio(card["frame"]) == pytest.approx(expected), card
            img = card["img"]
            assert int(img["width"]) / int(img["height"]) == pytest.approx(expected, rel=0.01)
            # The thumbnail itself has the image's proportions, so `contain` leaves no band.
            thumb = Image.open(io.BytesIO(env.get(img["src"], "alice").content))
            assert thumb.width / thumb.height == pytest.approx(expected, rel=0.01)
            assert max(thumb.size) == 480
    # Strips (DAG page, index) frame each thumbnail at its own ratio too: never a square crop.
    for path in (f"/flux-gallery/dags/{DAG_ID}", "/flux-gallery/"):
        parsed = _cards(env.get(path, "alice").text)
        wide = [a for a in parsed.links if "aspect-ratio: 1392 / 752" in a.get("style", "")]
        assert wide, path
        assert "object-fit: cover" not in env.get(path, "alice").text


def test_index_shows_the_latest_images_of_each_dag(gallery_env: GalleryEnv) -> None:
    env = gallery_env
    page = env.get("/flux-gallery/", "alice").text
    sections = {
        dag: next(s for s in page.split('<section class="run">') if f">{dag}</a>" in s) for dag in (DAG_ID, EDIT_DAG_ID)
    }
    latest = [i["sha256"] for i in env.manifest("wide")["images"]]  # the DAG's latest run comes first
    thumbs = re.findall(r'<img src="[^"]+/images/([0-9a-f]{64})\?size=thumb"', sections[DAG_ID])
    assert thumbs[:2] == latest and len(thumbs) == 6  # THUMBS_PER_DAG, from the latest runs
    # (Other tests' runs of the edit DAG may follow: this module's is the latest.)
    edit_shas = re.findall(r'/images/([0-9a-f]{64})\?size=thumb"', sections[EDIT_DAG_ID])
    assert edit_shas[0] == env.manifest("edit")["images"][0]["sha256"]
    # Each thumbnail opens that image's page.
    links = re.findall(r'<a href="([^"]+/images/[0-9a-f]{64}/view)"', sections[DAG_ID])
    assert [link.rsplit("/", 2)[-2] for link in links] == thumbs
    assert DAG_ID not in env.get("/flux-gallery/", "bob").text
    # Each of its latest runs' cost (what its images cost: $0.04 each, skipped ones included: they
    # were paid for), and their total.
    costs = re.findall(r'runs/([^"/]+)">[^<]+</a> <span class="cost">\$([0-9.]+)</span>', sections[DAG_ID])
    by_run = {run_id: label for label, run_id in env.runs.items()}
    expected = {run: 0.04 * len(env.manifest(by_run[unquote(run)])["images"]) for run, _ in costs}
    assert len(costs) == 3 and {run: float(cost) for run, cost in costs} == pytest.approx(expected)
    total = re.search(r'<strong class="total">\$([0-9.]+)</strong> in all', sections[DAG_ID])
    assert total and float(total.group(1)) == pytest.approx(sum(expected.values()))
    # The DAG's page says each run's cost too.
    dag_page = env.get(f"/flux-gallery/dags/{DAG_ID}", "alice").text
    foxes = dag_page.split(quote(env.runs["foxes"], safe=""), 1)[1].split("</h2>", 1)[0]
    assert '<span class="cost">$0.16</span>' in foxes  # four images of one request


def test_image_page_shows_everything_known_and_downloads(gallery_env: GalleryEnv) -> None:
    env = gallery_env
    run_id = env.runs["foxes"]
    manifest = env.manifest("foxes")
    entry = manifest["images"][2]  # flagged NSFW and kept
    view = _image_page(env, f"/flux-gallery/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/images/{entry['sha256']}/view")
    text = view["html"]
    s3_uri = f"s3://{env.bucket}/{entry['key']}"
    for fact in (
        "gallery foxes",
        str(entry["seed"]),
        "fal-ai/flux-pro/kontext/text-to-image",
        "1024\u00d71024",
        "flagged",
        entry["request_id"],
        "image 3",  # fal's index 2, counted from 1
        "$0.04",
        s3_uri,
        ">to_s3<",
    ):
        assert fact in text, fact
    assert entry["cost_usd"] == 0.04
    # The picture at a useful size, framed at its ratio; previous/next images of the run.
    assert env.get(view["src"], "alice").content == _s3_bytes(env, entry["key"])
    rels = {a.get("rel"): a["href"] for a in view["links"] if a.get("rel") in ("prev", "next")}
    assert rels["prev"].endswith(f"/images/{manifest['images'][1]['sha256']}/view")
    assert rels["next"].endswith(f"/images/{manifest['images'][3]['sha256']}/view")
    # The download link: the same bytes, as an attachment named like the S3 object.
    name = entry["key"].rsplit("/", 1)[-1]
    assert view["download"]["download"] == name
    download = env.get(view["download"]["href"], "alice")
    assert download.status_code == 200 and download.content == _s3_bytes(env, entry["key"])
    assert download.headers["content-disposition"].startswith(f'attachment; filename="{name}"')
    # The way back: the run's gallery page, the run and the task in Airflow (top window).
    hrefs = {a["href"]: a for a in view["links"]}
    run_path = f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
    assert f"/flux-gallery{run_path}" in hrefs
    assert hrefs[run_path]["target"] == "_top"
    assert hrefs[f"{run_path}/tasks/to_s3"]["target"] == "_top"

    # An edit: its input image is shown (a thumbnail the app reads from S3) with its s3:// URI.
    edit = env.manifest("edit")["images"][0]
    # Pinned to the object that was edited; the thumbnail below is read with that ETag.
    (pinned,) = edit["inputs"]
    assert pinned.startswith(f"s3://{env.bucket}/{EDIT_INPUT}?etag=")
    view = _image_page(
        env, f"/flux-gallery/dags/{EDIT_DAG_ID}/runs/{quote(env.runs['edit'], safe='')}/images/{edit['sha256']}/view"
    )
    assert edit["inputs"][0] in view["html"] and "fal-ai/flux-pro/kontext<" in view["html"]
    (src,) = [i["src"] for i in view["parsed"].images if "/inputs/" in i["src"]]
    from PIL import Image

    picture = Image.open(io.BytesIO(env.get(src, "alice").content))
    assert picture.size == (480, 320) and picture.getpixel((10, 10))[:3] == pytest.approx((210, 69, 45), abs=6)
    assert env.get(src.replace("/inputs/0", "/inputs/1"), "alice").status_code == 404  # only what the manifest lists
    assert env.get(src, "bob").status_code == 403


def test_embedded_mode_has_no_header_and_stays_in_its_tab(gallery_env: GalleryEnv) -> None:
    env = gallery_env
    run_id = quote(env.runs["foxes"], safe="")
    alone = env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}", "alice").text
    assert "<h1>Flux gallery</h1>" in alone and ">All DAGs</a>" in alone and "open in Airflow" in alone
    # The run's Images tab: no title, nothing above the run, every gallery link keeps the scope.
    tab = env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}?embed=run", "alice").text
    assert "<h1>" not in tab and "All DAGs" not in tab and "open in Airflow" not in tab
    gallery_links = [a["href"] for a in _cards(tab).links if a["href"].startswith("/flux-gallery/")]
    assert gallery_links and all("embed=run" in h for h in gallery_links), gallery_links
    assert f'href="/flux-gallery/dags/{DAG_ID}?' not in tab and 'href="/flux-gallery/?' not in tab
    # Its image pages keep the scope, and lead back to the run only.
    image_page = _image_page(env, next(h for h in gallery_links if h.endswith("/view?embed=run") or "/view?" in h))
    assert "<h1>" not in image_page["html"] and "All DAGs" not in image_page["html"]
    crumbs = re.search(r'<nav class="crumbs".*?</nav>', image_page["html"], re.S).group(0)  # type: ignore[union-attr]
    assert re.findall(r">([^<]+)</(?:a|span)>", crumbs) == [env.runs["foxes"], "image 1"]
    # The DAG's Images tab starts at the DAG: no link to the index.
    dag_tab = env.get(f"/flux-gallery/dags/{DAG_ID}?embed=dag", "alice").text
    assert "All DAGs" not in dag_tab and "<h1>" not in dag_tab
    assert all("embed=dag" in a["href"] for a in _cards(dag_tab).links if a["href"].startswith("/flux-gallery/"))


async def _log_in(page: Any, env: GalleryEnv, user: str) -> None:
    """Log ``user`` in as the UI does it: the JWT in the ``_token`` cookie (HttpOnly, SameSite=Lax)."""
    await page.send(
        "Network.setCookie",
        name="_token",
        value=env.tokens[user],
        url=env.api + "/",
        path="/",
        httpOnly=True,
        sameSite="Lax",
    )


async def _browse(env: GalleryEnv, binary: str, work: Path, out: Path) -> dict[str, Any]:
    """Open the to_s3 task's extra link in headless Chromium as alice; collect what rendered."""
    links = env.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{env.runs['foxes']}/taskInstances/to_s3/links", "admin").json()
    url = urljoin(env.api, links["extra_links"]["Flux gallery"])
    chromium = Chromium(binary, work)
    chromium.start()
    try:
        async with chromium.page() as page:
            seen: dict[str, Any] = {}
            # Not logged in: the gallery refuses, with a way to log in.
            seen["anonymous_status"] = await page.navigate(url)
            seen["anonymous_text"] = await page.evaluate("document.body.innerText")
            # Logged in as the UI does it: the JWT in the _token cookie (HttpOnly, SameSite=Lax).
            for user in ("bob", "alice"):
                await _log_in(page, env, user)
                seen[f"{user}_status"] = await page.navigate(url)
            # Lazy images load as they scroll into view: scroll down, then wait for every one.
            seen["images"] = await page.evaluate(
                """(async () => {
                    window.scrollTo(0, document.body.scrollHeight);
                    const imgs = [...document.images];
                    await Promise.all(imgs.map(i => i.complete ? null :
                        new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
                    window.scrollTo(0, 0);
                    return imgs.map(i => ({src: i.currentSrc, w: i.naturalWidth, h: i.naturalHeight,
                                           complete: i.complete,
                                           sha256: i.closest('figure').dataset.sha256}));
                })()"""
            )
            seen["screenshot"] = await page.screenshot(out / "03-run-page.png")
            # The same page as the UI shows it: the run's "Images" tab, the gallery in the UI's frame.
            tab = f"{env.api}/dags/{DAG_ID}/runs/{quote(env.runs['foxes'], safe='')}/plugin/flux-gallery-run"
            await page.navigate(tab)
            # The UI builds the frame after its own load event: wait for the frame's document and
            # every image in it to be there (an explicit page state, however slow the machine).
            seen["ui_frame"] = await _until(
                page,
                """(() => {
                    const frame = document.querySelector('iframe');
                    const doc = frame && frame.contentDocument;
                    if (!doc || doc.readyState !== 'complete') return null;
                    const imgs = [...doc.images];
                    if (!imgs.length || !imgs.every(i => i.complete)) return null;
                    return {src: frame.getAttribute('src'),
                            rendered: imgs.filter(i => i.naturalWidth > 0).length, total: imgs.length,
                            title: doc.querySelector('h1') ? doc.querySelector('h1').innerText : null,
                            text: doc.body.innerText};
                })()""",
            )
            seen["ui_screenshot"] = await page.screenshot(out / "08-airflow-run-images-tab.png")
            seen["full_view"] = {}
            # Full size: open each image as the browser does from a card; read the bytes it received.
            for image in seen["images"]:
                full = urljoin(url, image["src"].replace("?size=thumb", ""))
                status = await page.navigate(full)
                (response,) = [r for r in page.responses.values() if r.url == full]
                body = await page.body(response.request_id)
                size = await page.evaluate("[document.images[0].naturalWidth, document.images[0].naturalHeight]")
                seen["full_view"][image["sha256"]] = (status, hashlib.sha256(body).hexdigest(), size)
            return seen
    finally:
        chromium.stop()


def test_gallery_renders_in_headless_chromium(
    gallery_env: GalleryEnv, chromium_binary: str, screenshots: Path, tmp_path: Path
) -> None:
    env = gallery_env
    started = time.monotonic()
    seen = asyncio.run(_browse(env, chromium_binary, tmp_path, screenshots))
    manifest = env.manifest("foxes")
    print(f"\nscreenshots: {seen['screenshot']}, {seen['ui_screenshot']} (browser {time.monotonic() - started:.1f}s)")

    assert seen["anonymous_status"] == 401 and "Log in to Airflow" in seen["anonymous_text"]
    assert seen["bob_status"] == 403
    assert seen["alice_status"] == 200
    images = seen["images"]
    assert len(images) == 4
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    assert sorted(i["sha256"] for i in images) == sorted(i["sha256"] for i in manifest["images"])
    for entry in manifest["images"]:
        status, digest, size = seen["full_view"][entry["sha256"]]
        assert status == 200
        assert digest == entry["sha256"] == hashlib.sha256(_s3_bytes(env, entry["key"])).hexdigest()
        assert size == [entry["width"], entry["height"]]
    assert seen["screenshot"].stat().st_size > 10_000
    # Inside the Airflow UI (run page, "Images" tab): the frame is authenticated by the same cookie.
    # Embedded: no header of its own, nothing that would navigate inside the tab to other DAGs.
    frame = seen["ui_frame"]
    assert frame["src"] == f"/flux-gallery/dags/{DAG_ID}/runs/{quote(env.runs['foxes'], safe='')}?embed=run"
    assert (frame["rendered"], frame["total"]) == (4, 4)
    assert frame["title"] is None and "All DAGs" not in frame["text"] and "gallery foxes" in frame["text"]


_ALL_LOADED = """(async () => {
    window.scrollTo(0, document.body.scrollHeight);
    const imgs = [...document.images];
    await Promise.all(imgs.map(i => i.complete ? null :
        new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
    window.scrollTo(0, 0);
    return imgs.map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight}));
})()"""

# Each frame (a card's picture, a strip's thumbnail) beside the image it holds, as laid out.
_FRAMES = """[...document.querySelectorAll('figure.card a.pic, .strip a:not(.more), .viewer .full')].map(f => {
    const img = f.querySelector('img'); const r = f.getBoundingClientRect(); const i = img.getBoundingClientRect();
    return {frame: [r.width, r.height], drawn: [i.width, i.height], natural: [img.naturalWidth, img.naturalHeight],
            src: img.getAttribute('src')};
})"""


def _ours(env: GalleryEnv, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The images (or frames) of this module's runs. The index and the DAG page also show what
    other tests' runs left in the session's metadata DB, depending on the order the tests ran in:
    their images are those tests' business (some are deliberately not images)."""
    runs = [f"/runs/{quote(run_id, safe='')}/" for run_id in env.runs.values()]
    return [i for i in items if any(run in i["src"] for run in runs)]


async def _key(page: Any, key: str, code: int) -> None:
    for kind in ("keyDown", "keyUp"):
        text = {"text": "\r"} if key == "Enter" and kind == "keyDown" else {}
        await page.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code, **text)


#: How long a page may take to reach the state a test waits for (a bound, not a pause).
PAGE_TIMEOUT = 90.0


async def _wait_load(page: Any, timeout: float = PAGE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not page.events.get("Page.loadEventFired"):
        assert time.monotonic() < deadline, "page did not load"
        await asyncio.sleep(0.05)


async def _until(page: Any, expression: str, timeout: float = PAGE_TIMEOUT) -> Any:
    """Evaluate ``expression`` in the page until it is truthy (a page state), and return it."""
    deadline = time.monotonic() + timeout
    while not (value := await page.evaluate(expression)):
        assert time.monotonic() < deadline, f"never true within {timeout:.0f}s: {expression}"
        await asyncio.sleep(0.1)
    return value


async def _browse_pages(env: GalleryEnv, binary: str, work: Path, out: Path) -> dict[str, Any]:
    """As alice: the index, a 16:9 run, an image page (wide and narrow), an edit, the request link, the keyboard."""
    base = env.url("/flux-gallery")
    wide = quote(env.runs["wide"], safe="")
    foxes = quote(env.runs["foxes"], safe="")
    sha = env.manifest("foxes")["images"][0]["sha256"]
    edit = env.manifest("edit")["images"][0]["sha256"]
    links = env.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{env.runs['foxes']}/taskInstances/wait/links", "admin").json()
    chromium = Chromium(binary, work)
    chromium.start()
    seen: dict[str, Any] = {}
    try:
        async with chromium.page() as page:
            await _log_in(page, env, "alice")
            pages = {
                "index": (f"{base}/", "01-index.png"),
                "dag": (f"{base}/dags/{DAG_ID}", "02-dag-page.png"),
                "wide": (f"{base}/dags/{DAG_ID}/runs/{wide}", "04-run-16x9.png"),
                "image": (f"{base}/dags/{DAG_ID}/runs/{foxes}/images/{sha}/view", "05-image-page.png"),
                "edit": (
                    f"{base}/dags/{EDIT_DAG_ID}/runs/{quote(env.runs['edit'], safe='')}/images/{edit}/view",
                    "06-image-page-edit.png",
                ),
                "request": (urljoin(env.api, links["extra_links"]["FLUX request"]), "09-flux-request-link.png"),
            }
            for name, (url, shot) in pages.items():
                status = await page.navigate(url)
                images = await page.evaluate(_ALL_LOADED)
                seen[name] = {
                    "status": status,
                    "images": images,
                    "frames": await page.evaluate(_FRAMES),
                    "text": await page.evaluate("document.body.innerText"),
                    "overflow": await page.evaluate("document.documentElement.scrollWidth - window.innerWidth"),
                    "shot": await page.screenshot(out / shot),
                }
            # The keyboard alone: Tab to the first image of the run, Enter opens its page.
            await page.navigate(pages["wide"][0])
            focused = None
            for _ in range(40):
                await _key(page, "Tab", 9)
                focused = await page.evaluate(
                    "document.activeElement.matches('a.pic') ? [document.activeElement.getAttribute('href'), "
                    "getComputedStyle(document.activeElement).outlineStyle] : null"
                )
                if focused:
                    break
            page.events.pop("Page.loadEventFired", None)
            await _key(page, "Enter", 13)
            await _wait_load(page)
            seen["keyboard"] = {
                "focused": focused,
                "landed": await page.evaluate("location.pathname + location.search"),
            }
            # A phone-sized window: no sideways scrolling, the facts under the picture.
            await page.send(
                "Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=1, mobile=True
            )
            narrow = {
                "narrow_image": (pages["image"][0], ".viewer .full", ".facts"),
                "narrow_run": (pages["wide"][0], "ul.grid > li", "ul.grid > li + li"),
            }
            for name, (url, first, second) in narrow.items():
                await page.navigate(url)
                await page.evaluate(_ALL_LOADED)
                below = (
                    f"document.querySelector({second!r}).getBoundingClientRect().top >= "
                    f"document.querySelector({first!r}).getBoundingClientRect().bottom - 1"
                )
                seen[name] = {
                    "overflow": await page.evaluate("document.documentElement.scrollWidth - window.innerWidth"),
                    "stacked": await page.evaluate(below),
                    "shot": await page.screenshot(out / f"07-{name.replace('_', '-')}.png"),
                }
    finally:
        chromium.stop()
    return seen


def _true_to_ratio(frames: list[dict[str, Any]]) -> None:
    """Every frame has its image's proportions and the image fills it: no crop, no band."""
    assert frames
    for f in frames:
        (fw, fh), (dw, dh), (nw, nh) = f["frame"], f["drawn"], f["natural"]
        assert nw > 0 and nh > 0, f
        assert fw / fh == pytest.approx(nw / nh, rel=0.03), f
        assert (dw, dh) == pytest.approx((fw, fh), abs=1.5), f


def test_gallery_pages_in_headless_chromium(
    gallery_env: GalleryEnv, chromium_binary: str, screenshots: Path, tmp_path: Path
) -> None:
    env = gallery_env
    seen = asyncio.run(_browse_pages(env, chromium_binary, tmp_path, screenshots))
    for name in ("index", "dag"):  # they list other tests' runs too
        seen[name]["images"] = _ours(env, seen[name]["images"])
        seen[name]["frames"] = _ours(env, seen[name]["frames"])
    for name in ("index", "dag", "wide", "image", "edit", "request"):
        page = seen[name]
        assert page["status"] == 200, name
        assert page["images"] and all(i["w"] > 0 for i in page["images"]), (name, page["images"])
        assert page["overflow"] <= 0, name
        assert page["shot"].stat().st_size > 5_000, name
    # The index: the latest images of each DAG, framed true to their ratio.
    assert sum("size=thumb" in i["src"] for i in seen["index"]["images"]) >= 7  # 6 of one DAG, 1 of the edit's
    for name in ("index", "dag", "wide", "image"):
        _true_to_ratio(seen[name]["frames"])
    wide = [f for f in seen["wide"]["frames"] if f["natural"][0] > f["natural"][1]]
    assert len(wide) == 2 and all(f["frame"][0] / f["frame"][1] > 1.8 for f in wide)
    # The image page: the facts, the download, the way back.
    manifest = env.manifest("foxes")
    text = seen["image"]["text"]
    for fact in (manifest["images"][0]["prompt"], str(manifest["images"][0]["seed"]), "Download", "Back to the run"):
        assert fact in text, fact
    assert f"s3://{env.bucket}/{manifest['images'][0]['key']}" in text
    # The edit's page shows its input image.
    inputs = [i for i in seen["edit"]["images"] if "/inputs/" in i["src"]]
    assert len(inputs) == 1 and inputs[0]["w"] == 480
    # The "FLUX request" link opens the request's images in the gallery (the API would say 401).
    assert sum("size=thumb" in i["src"] for i in seen["request"]["images"]) == 4
    # Keyboard: Tab reaches an image with a visible focus ring; Enter opens its page.
    href, outline = seen["keyboard"]["focused"]
    assert outline == "solid" and seen["keyboard"]["landed"] == href and href.endswith("/view")
    for name in ("narrow_image", "narrow_run"):
        assert seen[name]["overflow"] <= 0 and seen[name]["stacked"], (name, seen[name])
    print(f"\ngallery screenshots: {screenshots}")


async def _connection_form(env: GalleryEnv, binary: str, work: Path, out: Path) -> dict[str, Any]:
    """Airflow's own "Add Connection" form for the flux type, as an admin sees it."""
    chromium = Chromium(binary, work, window=(1280, 1800))
    chromium.start()
    try:
        async with chromium.page() as page:
            await _log_in(page, env, "admin")
            await page.navigate(env.url("/connections"))

            async def click(label: str) -> None:
                x, y = await _until(
                    page,
                    f"(() => {{ const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === "
                    f"{label!r}); if (!b) return null; const r = b.getBoundingClientRect(); "
                    "return [r.x + 20, r.y + r.height / 2]; })()",
                )
                for kind in ("mousePressed", "mouseReleased"):
                    await page.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

            await click("Add Connection")
            await _until(page, "!!document.querySelector('input[aria-autocomplete=list]')")
            await page.evaluate("document.querySelector('input[aria-autocomplete=list]').focus()")
            await page.send("Input.insertText", text="FLUX (fal")
            # Enter picks the first option shown: wait until the list is filtered down to ours.
            await _until(
                page,
                "(() => { const o = [...document.querySelectorAll('[role=option], [id*=\"-option-\"]')]; "
                "return o.length > 0 && o[0].innerText.includes('FLUX (fal'); })()",
            )
            await _key(page, "Enter", 13)
            await click("Extra Fields")
            await _until(page, "document.body.innerText.includes('Re-base returned URLs')")
            # The form fills its fields from the type's defaults once shown: wait for a filled one.
            await _until(
                page,
                "[...(document.querySelector('[role=dialog]') || document.body).querySelectorAll('input')]"
                ".some(i => i.value === 'fal-ai/flux-pro/kontext/text-to-image')",
            )
            form = await page.evaluate(
                """(() => {
                    const dialog = document.querySelector('[role=dialog]') || document.body;
                    const checkbox = [...dialog.querySelectorAll('input[type=checkbox]')];
                    return {text: dialog.innerText,
                            values: [...dialog.querySelectorAll('input')].map(i => i.value).filter(v => v),
                            switches: checkbox.map(c => c.checked)};
                })()"""
            )
            form["shot"] = await page.screenshot(out / "10-connection-form.png")
            return form
    finally:
        chromium.stop()


def test_connection_form_shows_real_defaults_in_headless_chromium(
    gallery_env: GalleryEnv, chromium_binary: str, screenshots: Path, tmp_path: Path
) -> None:
    """No "null" choice; every field starts at what the hook does when it is left alone."""
    form = asyncio.run(_connection_form(gallery_env, chromium_binary, tmp_path, screenshots))
    text = form["text"]
    assert "null" not in text.lower(), text
    assert "Auto (Key on fal's hosts, Bearer elsewhere)" in text
    assert "Auto (on for non-fal hosts, off on fal's)" in text
    assert "fal-ai/flux-pro/kontext/text-to-image" in form["values"] and "60" in form["values"]
    assert form["switches"] == [True]  # "Let fal store payloads": on, fal's own default
    assert form["shot"].stat().st_size > 5_000


def test_presigned_delivery_redirects_to_a_short_lived_url(gallery_env: GalleryEnv) -> None:
    """``[flux_gallery] image_delivery = presigned``: after the same auth, a redirect to S3 itself.

    In process (TestClient), with the auth dependencies stubbed: the api-server test above covers them.
    """
    from fastapi.testclient import TestClient

    from airflow_flux.plugins import app as gallery

    env = gallery_env
    app = gallery.create_app(delivery="presigned", presigned_expiry=120)
    for dependency in gallery._READ_RUN_IMAGES:
        app.dependency_overrides[dependency.dependency] = lambda: None
    client = TestClient(app)
    run_id = env.runs["foxes"]
    for entry in env.manifest("foxes")["images"]:
        resp = client.get(f"/dags/{DAG_ID}/runs/{run_id}/images/{entry['sha256']}", follow_redirects=False)
        assert resp.status_code == 307
        location = urlsplit(resp.headers["location"])
        query = parse_qs(location.query)
        assert unquote(location.path) == f"/{env.bucket}/{entry['key']}"
        # SigV4 (X-Amz-Expires: lifetime) or SigV2 (Expires: epoch), as the connection's botocore signs.
        if "X-Amz-Expires" in query:
            assert query["X-Amz-Expires"] == ["120"] and query["X-Amz-Signature"]
        else:
            assert 100 <= int(query["Expires"][0]) - time.time() <= 121 and query["Signature"]
        body = requests.get(resp.headers["location"], timeout=10).content
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
        # The download link: S3 itself is told to answer as an attachment named like the object.
        resp_dl = client.get(
            f"/dags/{DAG_ID}/runs/{run_id}/images/{entry['sha256']}?download=1", follow_redirects=False
        )
        assert resp_dl.status_code == 307
        got = requests.get(resp_dl.headers["location"], timeout=10)
        name = entry["key"].rsplit("/", 1)[-1]
        assert got.content == _s3_bytes(env, entry["key"])
        assert got.headers["content-disposition"].startswith(f'attachment; filename="{name}"')
        # Thumbnails are still made (and cached) by the app.
        thumb = client.get(f"/dags/{DAG_ID}/runs/{run_id}/images/{entry['sha256']}?size=thumb")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    page = client.get(f"/dags/{DAG_ID}/runs/{run_id}")
    assert page.status_code == 200 and "img-src 'self' https: http:" in page.headers["content-security-policy"]
    # Without the presigned URL, the bucket itself refuses: it is not public.
    assert requests.get(resp.headers["location"].split("?")[0], timeout=10).status_code == 403
