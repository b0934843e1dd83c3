"""What the OpenLineage events say of a task: S3 naming, bounds, the run facet, no secrets.

The real run (the openlineage provider's listener and file transport on a real scheduler) is
``tests/system/test_real_airflow.py::test_lineage_and_metrics_of_an_edit_its_copy_and_a_batch``;
these check the record each operator keeps, and its translation by the installed provider.
"""

from __future__ import annotations

import json

import pytest

from airflow_flux.lineage import MAX_DATASETS, MAX_REQUEST_IDS, FluxLineage, dataset_name


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/in/x.jpg", ("s3://bucket", "in/x.jpg")),
        ("s3://bucket/prefix/run/", ("s3://bucket", "prefix/run")),
        ("s3://bucket", ("s3://bucket", "/")),  # a copy to the bucket's root names the root
        ("https://v3.fal.media/files/a.jpg?X-Amz-Signature=abc", ("https://v3.fal.media", "/files/a.jpg")),
        ("data:image/png;base64,AAAA", None),
        ("data:image/png (12 bytes)", None),
    ],
)
def test_datasets_are_named_as_the_amazon_provider_names_s3_objects(uri, expected):
    assert dataset_name(uri) == expected


def test_a_record_is_bounded_and_says_what_it_left_out():
    lineage = FluxLineage(endpoint="fal-ai/flux-pro/kontext")
    for n in range(3 * MAX_DATASETS):
        lineage.add_request(
            {
                "request_id": f"r{n}",
                "seed": n,
                "cost_usd": 0.04,
                "images": [{"url": "u"}],
                "inputs": [f"s3://b/in/{n}.jpg", "s3://b/in/shared.jpg", "data:image/png (3 bytes)"],
            }
        )
        lineage.add_output(f"s3://b/out/{n}.jpg")
    assert len(lineage.inputs) == MAX_DATASETS and len(lineage.outputs) == MAX_DATASETS
    assert len(lineage.request_ids) == MAX_REQUEST_IDS and len(lineage.seeds) == MAX_REQUEST_IDS
    facet = lineage.facet()
    assert facet["requests"] == 3 * MAX_DATASETS and facet["images"] == 3 * MAX_DATASETS
    assert facet["costUsd"] == round(0.04 * 3 * MAX_DATASETS, 6)
    # Every distinct input past the bound is counted (the shared one only once, and kept).
    assert "s3://b/in/shared.jpg" in lineage.inputs
    assert facet["inputsLeftOut"] == 3 * MAX_DATASETS + 1 - MAX_DATASETS
    assert facet["outputsLeftOut"] == 2 * MAX_DATASETS
    assert len(json.dumps(facet)) < 8_000  # a few KB whatever the batch's size


def test_failed_requests_are_named_but_not_priced():
    lineage = FluxLineage()
    lineage.add_request({"request_id": "ok", "endpoint": "e", "cost_usd": 0.04, "images": [{"url": "u"}]})
    lineage.add_request({"request_id": "bad", "status": "failed", "endpoint": "e", "error": "refused"})
    lineage.add_request({"request_id": "sent", "status": "submitted", "endpoint": "e"})
    assert lineage.facet() == {
        "endpoint": "e",
        "requests": 3,
        "requestIds": ["ok", "bad", "sent"],
        "seeds": [],
        "images": 1,
        "costUsd": 0.04,
    }


def test_the_installed_openlineage_provider_gets_datasets_and_the_flux_run_facet():
    pytest.importorskip("airflow.providers.openlineage")
    from openlineage.client.serde import Serde

    lineage = FluxLineage(endpoint="fal-ai/flux-pro/kontext")
    lineage.add_request({"request_id": "r1", "seed": 7, "cost_usd": 0.04, "inputs": ["s3://b/in/x.jpg"], "images": []})
    lineage.add_output("s3://b/prefix/run/manifest.json")
    lineage.add_output("s3://b/prefix/run/")
    ol = lineage.operator_lineage()
    assert [(d.namespace, d.name) for d in ol.inputs] == [("s3://b", "in/x.jpg")]
    assert [(d.namespace, d.name) for d in ol.outputs] == [
        ("s3://b", "prefix/run/manifest.json"),
        ("s3://b", "prefix/run"),
    ]
    facet = json.loads(Serde.to_json(ol.run_facets["flux"]))
    assert facet["requestIds"] == ["r1"] and facet["seeds"] == [7] and facet["costUsd"] == 0.04
    assert facet["endpoint"] == "fal-ai/flux-pro/kontext"


def test_the_operators_give_their_record_to_the_listener():
    from airflow_flux.operators import FluxBatchGenerateOperator, FluxGenerateOperator, FluxSubmitOperator
    from airflow_flux.sensors import FluxStatusSensor
    from airflow_flux.transfers import FluxToS3Operator

    for cls in (
        FluxSubmitOperator,
        FluxGenerateOperator,
        FluxBatchGenerateOperator,
        FluxStatusSensor,
        FluxToS3Operator,
    ):
        assert callable(getattr(cls, "get_openlineage_facets_on_complete", None)), cls
        assert callable(getattr(cls, "get_openlineage_facets_on_failure", None)), cls
    op = FluxSubmitOperator(task_id="t", prompt="p")
    assert op.get_openlineage_facets_on_complete(None) is None  # nothing ran: nothing to say
