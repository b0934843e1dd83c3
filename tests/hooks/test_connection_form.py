"""What the connection form saves is what the hook does: its defaults, "auto", on/off.

Airflow 3's form starts a new connection from each field's schema ``default`` and saves
every field into ``extra`` (None for an empty one), so these tests build ``extra`` the same
way from :func:`~airflow_flux.get_provider_info.get_provider_info`.
"""

from __future__ import annotations

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
