"""What a task read, wrote and paid for, as OpenLineage sees it: bounded, whatever the batch's size.

Each operator of the provider fills a :class:`FluxLineage` as it works (the ``s3://`` images an
edit read, the objects it wrote, the requests that made them) and hands it to the
openlineage provider through ``get_openlineage_facets_on_complete`` (:class:`FluxLineageMixin`).
An operator that returns its own inputs and outputs is not given the hook lineage
collector's, so the events say exactly what is here: at most :data:`MAX_DATASETS` inputs and
outputs (a larger copy is named by its prefix and its manifest) and :data:`MAX_REQUEST_IDS`
request ids, with the totals beside them.

Datasets follow the amazon provider's S3 naming: namespace ``s3://{bucket}``, name the key
(or the prefix, without its trailing ``/``). The openlineage provider is an optional extra
(``airflow-flux[openlineage]``): it is imported only when its listener asks for the facets,
never while a DAG file is parsed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

#: At most this many input and this many output datasets in one event.
MAX_DATASETS = 100
#: At most this many request ids (and seeds) in the run facet; ``requests`` counts them all.
MAX_REQUEST_IDS = 100
#: The run facet's key in the event (``run.facets.flux``).
FACET_NAME = "flux"


def dataset_name(uri: str) -> tuple[str, str] | None:
    """``(namespace, name)`` of an ``s3://`` or ``http(s)://`` URI, or None (``data:``, a summary)."""
    parts = urlsplit(uri)
    if parts.scheme == "s3" and parts.netloc:
        return f"s3://{parts.netloc}", parts.path.lstrip("/").rstrip("/") or "/"
    if parts.scheme in ("http", "https") and parts.netloc:
        # Only the address: a query may hold a signature, and lineage is kept for long.
        return f"{parts.scheme}://{parts.netloc}", parts.path or "/"
    return None


def named_or_prefix(names: list[str] | None, prefix: str) -> list[str]:
    """``names`` (objects a task read or wrote), or ``[prefix]`` when they are unknown or too many
    for one event beside their manifest: the one rule of the copy and the publish."""
    return names if names is not None and len(names) < MAX_DATASETS else [prefix]


class FluxLineage:
    """The inputs, outputs and requests of one task try, each list bounded.

    A plain class, not a dataclass: operator modules import it while a DAG file is parsed, and
    a dataclass's generated methods cost about a millisecond there.

    :param endpoint: the fal model path, when one endpoint made everything.
    """

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.request_ids: list[str] = []
        self.seeds: list[int] = []
        self.requests = 0
        self.images = 0
        self.cost_usd: float | None = None
        #: Inputs and outputs left out over the bound (said in the facet, never silently).
        self.inputs_left_out = 0
        self.outputs_left_out = 0
        self._seen: set[str] = set()

    @classmethod
    def of(cls, item: Mapping[str, Any]) -> FluxLineage:
        """The record of one request (:meth:`add_request`): a single request's task."""
        lineage = cls()
        lineage.add_request(item)
        return lineage

    def add_inputs(self, uris: Iterable[Any] | None) -> None:
        """Add the images a request was made from (``s3://`` URIs, unsigned URLs; others skipped)."""
        for uri in uris or ():
            if not isinstance(uri, str) or dataset_name(uri) is None or uri in self._seen:
                continue
            if len(self.inputs) >= MAX_DATASETS:
                self.inputs_left_out += 1
                continue
            self._seen.add(uri)
            self.inputs.append(uri)

    def add_output(self, uri: str) -> None:
        """Add an object (or a prefix, ending in ``/``) the task wrote."""
        if len(self.outputs) >= MAX_DATASETS:
            self.outputs_left_out += 1
        elif uri not in self.outputs:
            self.outputs.append(uri)

    def add_request(self, item: Mapping[str, Any]) -> None:
        """Count one finished request (a result, or a batch's result line) and its inputs."""
        self.add_inputs(item.get("inputs"))
        self.requests += 1
        if item.get("status", "completed") == "completed":
            self.images += len(item.get("images") or [])
            if item.get("cost_usd") is not None:
                self.cost_usd = round((self.cost_usd or 0.0) + float(item["cost_usd"]), 6)
        if item.get("request_id") and len(self.request_ids) < MAX_REQUEST_IDS:
            self.request_ids.append(str(item["request_id"]))
            if isinstance(item.get("seed"), int):
                self.seeds.append(item["seed"])
        if self.endpoint is None and item.get("endpoint"):
            self.endpoint = str(item["endpoint"])

    def facet(self) -> dict[str, Any]:
        """The run facet's fields (JSON)."""
        fields: dict[str, Any] = {
            "endpoint": self.endpoint,
            "requests": self.requests,
            "requestIds": self.request_ids,
            "seeds": self.seeds,
            "images": self.images,
            "costUsd": self.cost_usd,
        }
        if self.inputs_left_out or self.outputs_left_out:
            fields.update(inputsLeftOut=self.inputs_left_out, outputsLeftOut=self.outputs_left_out)
        return {k: v for k, v in fields.items() if v is not None}

    def operator_lineage(self) -> Any:
        """The openlineage provider's ``OperatorLineage`` of this record."""
        from airflow.providers.common.compat.openlineage.facet import Dataset, RunFacet
        from airflow.providers.openlineage.extractors import OperatorLineage

        def datasets(uris: list[str]) -> list[Any]:
            named = (dataset_name(uri) for uri in uris)
            return [Dataset(namespace=ns, name=name) for ns, name in filter(None, named)]

        return OperatorLineage(
            inputs=datasets(self.inputs),
            outputs=datasets(self.outputs),
            run_facets={FACET_NAME: RunFacet().with_additional_properties(**self.facet())},
        )


class FluxLineageMixin:
    """``get_openlineage_facets_on_complete`` (and on failure) from the :class:`FluxLineage`
    the operator kept in ``flux_lineage`` while it ran (None: nothing to say)."""

    flux_lineage: FluxLineage | None = None

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """What this try read, wrote and paid for (the openlineage provider calls it)."""
        return self.flux_lineage.operator_lineage() if self.flux_lineage is not None else None

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """The same on failure: what was paid for before the failure is on record too."""
        return self.get_openlineage_facets_on_complete(task_instance)
