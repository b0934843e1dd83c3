"""The gallery's link, plugin class and templates, without an api-server: URLs, registration, import cost."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from airflow_flux.links import FluxGalleryLink, FluxRequestLink, gallery_image_path, gallery_path


def test_gallery_urls_quote_ids_and_keep_the_base_path():
    run_id = "manual__2026-01-01T00:00:00+00:00"
    assert gallery_path("d", run_id, base_path="", task_id="to_s3", map_index=None) == (
        "/flux-gallery/dags/d/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00?task_id=to_s3"
    )
    assert gallery_path("d", base_path="/airflow/") == "/airflow/flux-gallery/dags/d"
    assert gallery_path(base_path="") == "/flux-gallery/"
    assert gallery_path("d", "r", base_path="", request_id="a b&c", map_index=2) == (
        "/flux-gallery/dags/d/runs/r?request_id=a+b%26c&map_index=2"
    )
    sha = "ab" * 32
    assert gallery_image_path("d", run_id, sha, base_path="") == (
        f"/flux-gallery/dags/d/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/images/{sha}/view"
    )
    assert (
        gallery_image_path("d", "r", sha, page=False, base_path="/a") == f"/a/flux-gallery/dags/d/runs/r/images/{sha}"
    )


def test_base_path_comes_from_the_api_base_url(monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team-a/")
    assert gallery_path("d") == "/team-a/flux-gallery/dags/d"


def test_operators_carry_the_link():
    from airflow_flux.operators import FluxGenerateOperator, FluxSubmitOperator
    from airflow_flux.sensors import FluxStatusSensor
    from airflow_flux.transfers import FluxToS3Operator

    for operator in (FluxToS3Operator, FluxGenerateOperator, FluxSubmitOperator, FluxStatusSensor):
        assert any(isinstance(link, FluxGalleryLink) for link in operator.operator_extra_links), operator
    for operator in (FluxGenerateOperator, FluxSubmitOperator, FluxStatusSensor):
        assert any(isinstance(link, FluxRequestLink) for link in operator.operator_extra_links), operator
    assert FluxGalleryLink().xcom_key == "_link_FluxGalleryLink"


def test_plugin_is_registered_by_entry_point_and_builds_its_app_lazily():
    (ep,) = [ep for ep in entry_points(group="airflow.plugins") if ep.name == "flux_gallery"]
    plugin_class = ep.load()
    from airflow.plugins_manager import is_valid_plugin

    assert is_valid_plugin(plugin_class)
    plugin = plugin_class()
    assert {v["destination"] for v in plugin.external_views} == {"nav", "dag", "dag_run"}
    assert len({v["url_route"] for v in plugin.external_views}) == 3  # the UI refuses clashing routes
    (app,) = plugin.fastapi_apps
    assert app["url_prefix"] == "/flux-gallery"
    paths = {route.path for route in app["app"].routes}
    assert paths >= {
        "/",
        "/dags/{dag_id}",
        "/dags/{dag_id}/runs/{run_id}",
        "/dags/{dag_id}/runs/{run_id}/images/{sha256}",
    }


def test_plugin_import_is_light():
    """Every Airflow component loads plugins: only the api-server should pay for the app."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import airflow_flux.plugins.gallery"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "airflow_flux.links.flux" in imported
    assert not {name.split(".")[0] for name in imported} & {"fastapi", "starlette", "boto3", "botocore", "PIL"}
    assert "airflow_flux.plugins.app" not in imported


def test_pages_escape_what_manifests_say():
    """Prompts (and any manifest field) are user text: escaped, never markup."""
    from airflow_flux.plugins.pages import _templates

    evil = '<img src=x onerror="alert(1)">'
    frame = {"ratio": "1 / 1", "known": False}
    card = {"stored": False, "prompt": evil, "reason": "<b>nsfw</b>", "task_label": "t", "frame": frame, "number": 1}
    crumbs = [{"label": "<d>", "url": None}]
    context = {"cards": [card], "dag_id": "<d>", "run_id": "r", "tasks": [], "total": 1, "urls": {}, "pages": 1}
    html = _templates.get_template("run.html").render(crumbs=crumbs, **context)
    assert "<img src=x" not in html and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert "<b>nsfw</b>" not in html and "&lt;d&gt;" in html
    # The image page: the prompt, an input's URI and the file name are escaped too.
    card |= {"stored": True, "s3_uri": "s3://b/<k>", "sha256": "0" * 64}
    inputs = [{"uri": f"https://x/{evil}", "src": None, "link": f"https://x/{evil}"}]
    html = _templates.get_template("image.html").render(
        c=card, inputs=inputs, filename=evil, full=frame, crumbs=crumbs, urls={}, of=1, position=1
    )
    assert "<img src=x" not in html and "s3://b/&lt;k&gt;" in html
