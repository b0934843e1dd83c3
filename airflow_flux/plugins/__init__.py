"""The provider's Airflow UI plugin: the **Flux gallery** (registered via the ``airflow.plugins`` entry point).

* :mod:`airflow_flux.plugins.gallery`: the plugin class (nav entry, DAG and run tabs, the app).
* :mod:`airflow_flux.plugins.app`: the FastAPI app the api-server mounts at ``/flux-gallery`` (its routes).
* :mod:`airflow_flux.plugins.pages`: what the pages show (URLs, breadcrumbs, frames, cards), for the templates.
* :mod:`airflow_flux.plugins.records`: finds a run's manifests in the metadata DB, checked against its tasks' records.
* :mod:`airflow_flux.plugins.store`: reads manifests and images from S3 for the app.

The gallery's extra links live in :mod:`airflow_flux.links` (the operators import them).
Nothing is imported here, so loading the plugin class stays cheap in every component.
"""
