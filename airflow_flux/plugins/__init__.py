"""The provider's Airflow UI plugin: the **Flux gallery** (registered via the ``airflow.plugins`` entry point).

* :mod:`airflow_flux.plugins.gallery`: the plugin class (nav entry, DAG and run tabs, the app).
* :mod:`airflow_flux.plugins.links`: the gallery's operator extra link (light: no FastAPI import).
* :mod:`airflow_flux.plugins.app`: the FastAPI app the api-server mounts at ``/flux-gallery``.

Nothing is imported here, so ``import airflow_flux.plugins.links`` (done by the operators) stays cheap.
"""
