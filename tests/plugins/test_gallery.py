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
import re
import time
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import pytest
import requests

from tests.plugins.cdp import Chromium
from tests.plugins.conftest import DAG_ID, GalleryEnv

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(300)


class _Cards(HTMLParser):
    """The image cards of a gallery page: each figure's data attributes, its <img> and links."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, Any]] = []
        self.links: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "figure":
            self.cards.append({"class": a.get("class", ""), "sha256": a.get("data-sha256"), "img": None, "full": None})
        elif tag == "img" and self.cards:
            self.cards[-1]["img"] = a
        elif tag == "a":
            self.links.append(a)
            if self.cards and "pic" in a.get("class", ""):
                self.cards[-1]["full"] = a["href"]


def _cards(html: str) -> _Cards:
    parser = _Cards()
    parser.feed(html)
    return parser


def _s3_bytes(env: GalleryEnv, key: str) -> bytes:
    return env.s3.get_object(Bucket=env.bucket, Key=key)["Body"].read()


def test_plugin_is_registered_and_tasks_link_to_their_images(gallery_env: GalleryEnv) -> None:
    env = gallery_env
    plugins = env.get("/api/v2/plugins", "admin").json()["plugins"]
    (plugin,) = [p for p in plugins if p["name"] == "flux_gallery"]
    assert plugin["source"].startswith("airflow-flux==")  # the package's entry point, no copied file
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/flux-gallery"]
    views = {v["destination"]: v for v in plugin["external_views"]}
    assert views["nav"]["href"] == "/flux-gallery/" and views["nav"]["category"] == "browse"
    assert views["dag_run"]["href"] == "/flux-gallery/dags/{DAG_ID}/runs/{RUN_ID}"
    assert env.get("/api/v2/importErrors", "admin").json()["total_entries"] == 0

    run_id = env.runs["foxes"]
    base = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"
    to_s3 = env.get(f"{base}/to_s3/links", "admin").json()["extra_links"]
    wait = env.get(f"{base}/wait/links", "admin").json()["extra_links"]
    manifest = env.manifest("foxes")
    (request_id,) = {i["request_id"] for i in manifest["images"]}
    assert to_s3["Flux gallery"] == f"/flux-gallery/dags/{DAG_ID}/runs/{quote(run_id, safe='')}?task_id=to_s3"
    assert parse_qs(urlsplit(wait["Flux gallery"]).query) == {"request_id": [request_id]}
    assert wait["FLUX request"]  # the existing link is still there


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
    for card in cards:
        entry = stored[card["sha256"]]
        assert ("nsfw" in card["class"]) == entry["nsfw"]
        assert card["img"]["loading"] == "lazy"
        full = env.get(card["full"], "alice")
        assert full.headers["content-type"] == "image/jpeg"
        # The bytes served are the object in S3, whose digest the manifest recorded.
        assert hashlib.sha256(full.content).hexdigest() == entry["sha256"]
        assert full.content == _s3_bytes(env, entry["key"])
        assert full.headers["etag"] == f'"{entry["sha256"]}"'
        assert env.get(card["full"], "alice", headers={"If-None-Match": full.headers["etag"]}).status_code == 304
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
        run: next(s for s in dag_page.split('<section class="run">') if quote(run_id, safe="") in s)
        for run, run_id in env.runs.items()
    }  # (other tests' runs of this DAG may be listed too)
    assert {run: len(re.findall(r'<img src="[^"]+size=thumb"', s)) for run, s in sections.items()} == {
        "foxes": 4,
        "owls": 1,
    }

    # Only images of the run's manifests are served: another digest, or another run's image, is a 404.
    assert env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}/images/{'0' * 64}", "alice").status_code == 404
    owl_sha = next(c["sha256"] for c in owl_cards if c["img"])
    assert env.get(f"/flux-gallery/dags/{DAG_ID}/runs/{run_id}/images/{owl_sha}", "alice").status_code == 404
    assert env.get(f"/flux-gallery/dags/{DAG_ID}/runs/no_such_run", "alice").status_code == 404


async def _browse(env: GalleryEnv, binary: str, out: Path) -> dict[str, Any]:
    """Open the to_s3 task's extra link in headless Chromium as alice; collect what rendered."""
    links = env.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{env.runs['foxes']}/taskInstances/to_s3/links", "admin").json()
    url = urljoin(env.api, links["extra_links"]["Flux gallery"])
    chromium = Chromium(binary, out)
    chromium.start()
    try:
        async with chromium.page() as page:
            seen: dict[str, Any] = {}
            # Not logged in: the gallery refuses, with a way to log in.
            seen["anonymous_status"] = await page.navigate(url)
            seen["anonymous_text"] = await page.evaluate("document.body.innerText")
            # Logged in as the UI does it: the JWT in the _token cookie (HttpOnly, SameSite=Lax).
            for user in ("bob", "alice"):
                await page.send(
                    "Network.setCookie",
                    name="_token",
                    value=env.tokens[user],
                    url=env.api + "/",
                    path="/",
                    httpOnly=True,
                    sameSite="Lax",
                )
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
            seen["screenshot"] = await page.screenshot(out / "flux-gallery.png")
            # The same page as the UI shows it: the run's "Images" tab, the gallery in the UI's frame.
            tab = f"{env.api}/dags/{DAG_ID}/runs/{quote(env.runs['foxes'], safe='')}/plugin/flux-gallery-run"
            await page.navigate(tab)
            seen["ui_frame"] = await page.evaluate(
                """(async () => {
                    for (let i = 0; i < 200; i++) {
                        const frame = document.querySelector('iframe');
                        const doc = frame && frame.contentDocument;
                        const imgs = doc ? [...doc.images] : [];
                        if (imgs.length && imgs.every(i => i.complete)) {
                            return {src: frame.getAttribute('src'),
                                    rendered: imgs.filter(i => i.naturalWidth > 0).length, total: imgs.length};
                        }
                        await new Promise(r => setTimeout(r, 100));
                    }
                    return null;
                })()"""
            )
            seen["ui_screenshot"] = await page.screenshot(out / "airflow-ui-images-tab.png")
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


def test_gallery_renders_in_headless_chromium(gallery_env: GalleryEnv, chromium_binary: str, tmp_path: Path) -> None:
    env = gallery_env
    started = time.monotonic()
    seen = asyncio.run(_browse(env, chromium_binary, tmp_path))
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
    assert seen["ui_frame"] == {
        "src": f"/flux-gallery/dags/{DAG_ID}/runs/{quote(env.runs['foxes'], safe='')}",
        "rendered": 4,
        "total": 4,
    }


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
        # Thumbnails are still made (and cached) by the app.
        thumb = client.get(f"/dags/{DAG_ID}/runs/{run_id}/images/{entry['sha256']}?size=thumb")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    page = client.get(f"/dags/{DAG_ID}/runs/{run_id}")
    assert page.status_code == 200 and "img-src 'self' https: http:" in page.headers["content-security-policy"]
    # Without the presigned URL, the bucket itself refuses: it is not public.
    assert requests.get(resp.headers["location"].split("?")[0], timeout=10).status_code == 403
