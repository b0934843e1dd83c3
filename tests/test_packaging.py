"""The package installs as an Airflow provider and stays cheap to import."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import airflow_flux
from airflow_flux.get_provider_info import get_provider_info


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
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    manager = ProvidersManager()
    assert "airflow-flux" in manager.providers
    assert "extra__flux__auth_scheme" in manager.connection_form_widgets
    hook = ProvidersManagerTaskRuntime().hooks["flux"]
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
    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        assert getattr(importlib.import_module(module), name)


def test_public_import_paths():
    from airflow_flux.hooks import FluxHook
    from airflow_flux.operators import FluxGenerateOperator, FluxSubmitOperator
    from airflow_flux.sensors import FluxStatusSensor
    from airflow_flux.transfers import FluxToS3Operator
    from airflow_flux.triggers import FluxStatusTrigger

    assert all(
        (FluxHook, FluxGenerateOperator, FluxSubmitOperator, FluxStatusSensor, FluxStatusTrigger, FluxToS3Operator)
    )
