"""The connection form on Airflow 3.1, built from the fields 3.2 and later read declaratively.

Airflow 3.2+ reads the form from the provider info (``conn-fields`` and ``ui-field-behaviour``
in :mod:`airflow_flux.get_provider_info`) without importing the hook. Airflow 3.1 asks the
hook class instead (``get_connection_form_widgets`` and ``get_ui_field_behaviour``, looked up
in the class's own ``__dict__``) and turns the WTForms fields into the UI's form, with
stand-ins for WTForms and Flask-AppBuilder when those are not installed: the imports happen
when Airflow calls, never at DAG parse time. 3.1 knows string, integer, password and boolean
fields only, so a choice is a string field limited to its values and a decimal number is a
string field; the hook reads both from their text (:mod:`~airflow_flux.hooks.settings`).
"""

from __future__ import annotations

from typing import Any

from airflow_flux.get_provider_info import get_provider_info


def _connection_type() -> dict[str, Any]:
    (conn,) = (c for c in get_provider_info()["connection-types"] if c["connection-type"] == "flux")
    return conn


def ui_field_behaviour() -> dict[str, Any]:
    """The standard fields' labels, placeholders and hidden fields (``get_ui_field_behaviour``).

    The provider info spells the keys ``hidden-fields``; the hook method ``hidden_fields``.
    """
    return {key.replace("-", "_"): value for key, value in _connection_type()["ui-field-behaviour"].items()}


def connection_form_widgets() -> dict[str, Any]:
    """The extra fields as WTForms fields (``get_connection_form_widgets``), from ``conn-fields``."""
    from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import BooleanField, IntegerField, StringField
    from wtforms.validators import Optional, any_of

    widgets: dict[str, Any] = {}
    for name, field in _connection_type()["conn-fields"].items():
        schema = field["schema"]
        kinds = schema["type"]
        default = schema.get("default")
        common = {"label": lazy_gettext(field["label"]), "description": field.get("description", "")}
        if "boolean" in kinds:
            widgets[name] = BooleanField(default=default, **common)
        elif "integer" in kinds:
            widgets[name] = IntegerField(
                widget=BS3TextFieldWidget(), validators=[Optional()], default=default, **common
            )
        else:
            validators = [Optional(), *([any_of(schema["enum"])] if "enum" in schema else [])]
            text = None if default is None else str(default)
            widgets[name] = StringField(widget=BS3TextFieldWidget(), validators=validators, default=text, **common)
    return widgets
