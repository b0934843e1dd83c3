"""What the connection form saves is what the hook does: its defaults, "auto", on/off.

Airflow 3's form starts a new connection from each field's schema ``default`` and saves
every field into ``extra`` (None for an empty one), so these tests build ``extra`` the same
way from :func:`~airflow_flux.get_provider_info.get_provider_info`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from airflow_flux.exceptions import FluxConfigError
from airflow_flux.get_provider_info import get_provider_info
from airflow_flux.hooks import FluxConnectionSettings

FAL = "https://queue.fal.run"
AGGREGATOR = "https://api.aggregator.example/fal"


def _conn_fields() -> dict[str, Any]:
    (conn,) = get_provider_info()["connection-types"]
    return dict(conn["conn-fields"])


def _settings(make_flux_conn, base_url: str, **extra: Any) -> FluxConnectionSettings:
    from airflow.sdk import BaseHook

    return FluxConnectionSettings.from_connection(BaseHook.get_connection(make_flux_conn(base_url, **extra)))


def _as_the_form_saves_a_new_connection() -> dict[str, Any]:
    return {name: field["schema"].get("default") for name, field in _conn_fields().items()}


def _served_form() -> dict[str, Any]:
    """The flux form as the api-server hands it to the UI (``/ui/connections/hook_meta``).

    In a fresh process: Airflow 3.1 builds it once per process from the hook's WTForms fields
    (with stand-ins for WTForms), 3.2+ from the provider info.
    """
    code = (
        "import json\n"
        "from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService\n"
        "(flux,) = [h for h in HookMetaService.hook_meta_data() if h.connection_type == 'flux']\n"
        "print('FORM=' + json.dumps(flux.model_dump(mode='json')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("FORM=")]
    return json.loads(line.removeprefix("FORM="))


@pytest.mark.parametrize("base_url", [FAL, AGGREGATOR])
def test_the_served_form_has_every_field_and_its_defaults_behave_as_no_extras(make_flux_conn, base_url):
    # On every supported Airflow: 3.1 reads the hook's methods, 3.2+ the declaration.
    form = _served_form()
    standard = form["standard_fields"]
    assert standard["login"]["hidden"] and standard["port"]["hidden"]
    assert (standard["host"]["title"], standard["password"]["title"]) == ("Base URL", "API token")
    fields = form["extra_fields"]
    assert set(fields) == set(_conn_fields())
    assert fields["auth_scheme"]["schema"]["enum"] == ["auto", "Key", "Bearer"]
    assert fields["rebase_urls"]["schema"]["enum"] == ["auto", "on", "off"]
    assert "boolean" in fields["store_io"]["schema"]["type"]
    for name, field in fields.items():
        assert field["schema"]["title"] == _conn_fields()[name]["label"], name
    saved = {name: field["value"] for name, field in fields.items()}  # a new connection, saved
    assert saved["auth_scheme"] == "auto"
    assert _settings(make_flux_conn, base_url, **saved) == _settings(make_flux_conn, base_url)


@pytest.mark.parametrize("base_url", [FAL, "", AGGREGATOR, "http://127.0.0.1:8787"])
def test_a_new_connection_saved_with_the_forms_defaults_behaves_as_one_without_extras(make_flux_conn, base_url):
    form = _as_the_form_saves_a_new_connection()
    assert form["auth_scheme"] == form["rebase_urls"] == "auto"  # the host decides, as with no extra
    assert _settings(make_flux_conn, base_url, **form) == _settings(make_flux_conn, base_url)


def test_auto_is_decided_from_the_host(make_flux_conn):
    fal = _settings(make_flux_conn, FAL, auth_scheme="auto", rebase_urls="auto")
    assert (fal.auth_scheme, fal.rebase_urls) == ("Key", False)
    agg = _settings(make_flux_conn, AGGREGATOR, auth_scheme="Auto", rebase_urls=" AUTO ")
    assert (agg.auth_scheme, agg.rebase_urls) == ("Bearer", True)


def test_an_explicit_choice_overrides_the_host(make_flux_conn):
    fal = _settings(make_flux_conn, FAL, auth_scheme="Bearer", rebase_urls="on")
    assert (fal.auth_scheme, fal.rebase_urls) == ("Bearer", True)
    agg = _settings(make_flux_conn, AGGREGATOR, auth_scheme="Key", rebase_urls="off")
    assert (agg.auth_scheme, agg.rebase_urls) == ("Key", False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("on", True),
        ("off", False),
        (True, True),
        (False, False),
        ("true", True),
        ("False", False),
        ("yes", True),
        ("no", False),
        (1, True),
        (0, False),
        (None, True),  # an empty field: the host decides (on, for an aggregator)
        ("", True),
    ],
)
def test_rebase_urls_reads_the_forms_choices_and_stored_booleans(make_flux_conn, value, expected):
    assert _settings(make_flux_conn, AGGREGATOR, rebase_urls=value).rebase_urls is expected


def test_a_rebase_urls_value_that_is_no_choice_is_refused_naming_it(make_flux_conn):
    # Read as "off" before: a typo then moved where the returned URLs go, silently.
    with pytest.raises(FluxConfigError, match=r"extra rebase_urls must be auto, on or off, got 'ture'"):
        _settings(make_flux_conn, AGGREGATOR, rebase_urls="ture")


def test_the_prefixed_keys_of_older_forms_still_count(make_flux_conn):
    agg = _settings(make_flux_conn, AGGREGATOR, extra__flux__auth_scheme="auto", extra__flux__rebase_urls="off")
    assert (agg.auth_scheme, agg.rebase_urls) == ("Bearer", False)
