"""The package installs as an Airflow provider and stays cheap to import."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import airflow_flux
from airflow_flux.compat import AIRFLOW_VERSION
from airflow_flux.get_provider_info import get_provider_info

#: Airflow reads a provider's declarative connection form (conn-fields) from 3.2.
DECLARATIVE_FORM = AIRFLOW_VERSION.release[:2] >= (3, 2)
NO_FORM = "Airflow 3.1 builds the form from the hook's WTForms fields (tests/hooks/test_connection_form.py)"


def test_provider_entry_point_declares_the_flux_connection():
    (ep,) = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_flux.")]
    info = ep.load()()
    assert info == get_provider_info()
    assert info["package-name"] == "airflow-flux"
    assert info["versions"][0] == airflow_flux.__version__
    (conn,) = info["connection-types"]
    assert conn["connection-type"] == "flux"
    assert conn["hook-class-name"] == "airflow_flux.hooks.flux.FluxHook"
    assert conn["ui-field-behaviour"]["relabeling"]["password"] == "API token"


def test_airflow_sees_the_hook_for_the_flux_connection_type():
    from airflow.providers_manager import ProvidersManager

    try:  # the workers' view of hooks (3.2+); before, the one ProvidersManager has it
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime as Runtime
    except ImportError:
        Runtime = ProvidersManager  # type: ignore[assignment,misc]

    manager = ProvidersManager()
    assert "airflow-flux" in manager.providers
    if DECLARATIVE_FORM:
        assert "extra__flux__auth_scheme" in manager.connection_form_widgets
    hook = Runtime().hooks["flux"]
    assert hook is not None
    assert hook.hook_class_name == "airflow_flux.hooks.flux.FluxHook"
    assert hook.connection_id_attribute_name == "flux_conn_id"


def test_hook_class_attributes():
    from airflow_flux.hooks import FluxHook

    assert (FluxHook.conn_type, FluxHook.default_conn_name, FluxHook.conn_name_attr) == (
        "flux",
        "flux_default",
        "flux_conn_id",
    )


def _imported_modules(statement: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    return proc.stderr


def test_importing_the_package_pulls_in_no_heavy_dependency():
    for statement in ("import airflow_flux", "import airflow_flux.models", "import airflow_flux.emulator"):
        imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in _imported_modules(statement).splitlines()}
        assert not imported & {"boto3", "botocore", "aiohttp", "PIL", "aiobotocore"}, statement


def test_provider_info_lists_every_module_and_they_import():
    import importlib

    info = get_provider_info()
    for kind in ("hooks", "operators", "sensors", "triggers"):
        for entry in info[kind]:
            for module in entry["python-modules"]:
                importlib.import_module(module)
    for transfer in info["transfers"]:
        importlib.import_module(transfer["python-module"])
    from airflow.sdk import BaseOperatorLink

    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name), BaseOperatorLink), link


def test_public_import_paths_are_the_classes_the_provider_registers():
    import importlib

    info = get_provider_info()
    registered = {
        kind: {m for e in info[kind] for m in e["python-modules"]}
        for kind in ("hooks", "operators", "sensors", "triggers")
    }
    registered["transfers"] = {t["python-module"] for t in info["transfers"]}
    public = {
        "hooks": ["FluxHook"],
        "operators": ["FluxSubmitOperator", "FluxGenerateOperator", "FluxBatchGenerateOperator"],
        "sensors": ["FluxStatusSensor"],
        "triggers": ["FluxStatusTrigger", "FluxBatchTrigger"],
        "transfers": ["FluxToS3Operator"],
    }
    for kind, names in public.items():
        package = importlib.import_module(f"airflow_flux.{kind}")
        for name in names:
            assert name in package.__all__, (kind, name)
            cls = getattr(package, name)
            assert isinstance(cls, type) and cls.__name__ == name, (kind, name)
            # What ``from airflow_flux.<kind> import <name>`` gives is what Airflow lists.
            assert cls.__module__ in registered[kind], (kind, name, cls.__module__)


def _new_modules_over_airflow_sdk(statement: str) -> set[str]:
    code = (
        "import sys, airflow.sdk\nbefore = set(sys.modules)\n"
        f"{statement}\n"
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


def test_dag_facing_modules_pull_in_no_heavy_dependency_over_the_task_sdk():
    # What a DAG file imports is paid on every parse (the DAG processor pre-imports airflow.* only).
    new = _new_modules_over_airflow_sdk(
        "import airflow_flux.operators, airflow_flux.sensors, airflow_flux.transfers, airflow_flux.links"
    )
    heavy = {"boto3", "botocore", "aiobotocore", "aiohttp", "PIL", "requests", "fastapi", "tenacity"}
    assert not {m.split(".")[0] for m in new} & heavy
    assert not {m for m in new if m.startswith(("airflow_flux.hooks", "airflow_flux.triggers"))}


def test_importing_the_dag_facing_modules_builds_no_pydantic_validator():
    # defer_build: parsing pays for the request model only, when an operator validates its values.
    code = (
        "import airflow_flux.operators, airflow_flux.sensors, airflow_flux.transfers\n"
        "from pydantic import BaseModel\n"
        "from airflow_flux import models\n"
        "built = [n for n, v in vars(models).items() if isinstance(v, type) and issubclass(v, BaseModel)\n"
        "         and v is not BaseModel and v.__pydantic_complete__]\n"
        "print(built)\n"
        "from airflow_flux.operators import FluxSubmitOperator\n"
        "FluxSubmitOperator(task_id='t', prompt='a fox')\n"
        "print(models.KontextTextToImageRequest.__pydantic_complete__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[:2] == ["[]", "True"], proc.stdout


def test_a_bad_value_fails_the_first_parse_of_a_fresh_process_naming_the_field():
    # The first validation also builds the deferred request model: same error, same message.
    code = "from airflow_flux.operators import FluxSubmitOperator\nFluxSubmitOperator(task_id='bad', prompt='a fox', num_images=5)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "FluxValidationError: Task 'bad': Invalid request for fal-ai/flux-pro/kontext/text-to-image: " in proc.stderr
    assert "num_images: must be a number from 1 to 4 (got 5)" in proc.stderr


def _served_form_fields() -> dict[str, dict]:
    """The flux fields as the api-server hands them to the UI's connection form (hook_meta)."""
    from airflow.providers_manager import ProvidersManager

    prefix = "extra__flux__"
    widgets = ProvidersManager().connection_form_widgets
    return {key[len(prefix) :]: widget.field for key, widget in widgets.items() if key.startswith(prefix)}


@pytest.mark.skipif(not DECLARATIVE_FORM, reason=NO_FORM)
def test_the_connection_form_shows_real_defaults_not_null():
    fields = _served_form_fields()
    assert set(fields) == set(get_provider_info()["connection-types"][0]["conn-fields"])
    for name, field in fields.items():
        schema = field["schema"]
        assert field["value"] == schema.get("default"), name  # what a new connection starts from
        if "enum" in schema:
            # The UI's dropdown labels a None choice "null" and selects it for an empty value.
            assert None not in schema["enum"], name
            assert field["value"] in schema["enum"], name
            assert set(schema["values_display"]) == set(schema["enum"]), name
        if "boolean" in schema["type"]:
            # A switch shows bool(value): without a default it reads "off" whatever the hook does.
            assert isinstance(field["value"], bool), name
    assert fields["auth_scheme"]["value"] == fields["rebase_urls"]["value"] == "auto"
    assert "Auto:" in fields["rebase_urls"]["description"]  # says what auto does
    assert fields["store_io"]["value"] is True
    from airflow_flux.hooks.settings import DEFAULT_TIMEOUT
    from airflow_flux.models import KONTEXT_TEXT_TO_IMAGE

    assert fields["endpoint"]["value"] == KONTEXT_TEXT_TO_IMAGE
    assert fields["timeout"]["value"] == DEFAULT_TIMEOUT


VISIBLE_DESCRIPTION = "Generate images with FLUX.1 Kontext [pro] on fal's queue API and copy them to S3"


def _visible(text: str) -> str:
    return text.replace("\u2060", "")  # the word joiner is zero width: no terminal or browser shows it


def test_providers_list_shows_pro_in_the_description():
    # Rich reads "[pro]" as a markup tag and drops it unless something breaks the tag up.
    env = {**os.environ, "COLUMNS": "250"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "providers", "list"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    )
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("airflow-flux")]
    assert VISIBLE_DESCRIPTION in _visible(line), line


def test_the_ui_providers_page_reads_the_description_as_written():
    # The page shows the API's description as plain text: no escape character may show there.
    from airflow.api_fastapi.core_api.services.public.providers import _provider_mapper
    from airflow.providers_manager import ProvidersManager

    description = _provider_mapper(ProvidersManager().providers["airflow-flux"]).description
    assert _visible(description) == VISIBLE_DESCRIPTION
    assert "\\" not in description


def test_the_airflow_options_read_are_declared_with_the_codes_defaults():
    import json
    import subprocess
    import sys
    from importlib.resources import files

    import jsonschema

    from airflow_flux.hooks.shared import DEFAULT_MAX_CONNECTIONS

    info = get_provider_info()
    schema = json.loads(files("airflow").joinpath("provider_info.schema.json").read_text())
    jsonschema.validate({**info}, schema)
    config = info["config"]
    assert config["flux"]["options"]["max_connections"]["default"] == str(DEFAULT_MAX_CONNECTIONS)
    # Airflow itself knows the options and their defaults (a fresh process: conf is global).
    code = (
        "from airflow.configuration import conf\n"
        "print(conf.get('flux', 'max_connections'), conf.get('flux_gallery', 'image_delivery'),"
        " conf.get('flux_gallery', 'presigned_expiry'), conf.get('flux_gallery', 'aws_conn_id'),"
        " conf.get('flux_gallery', 'page_size'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == [str(DEFAULT_MAX_CONNECTIONS), "stream", "300", "aws_default", "24"]
