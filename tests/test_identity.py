"""Request fingerprints, the stored record and the handle's connection (pure functions)."""

from __future__ import annotations

import hashlib
import json

import pytest

from airflow_flux.exceptions import FluxValidationError
from airflow_flux.identity import RequestIdentity, StoredRequest, coerce_handle, conn_id_for

BASE = "https://queue.fal.run"
EP = "fal-ai/flux-pro/kontext/text-to-image"


def test_fingerprint_is_sha256_of_the_canonical_request():
    identity = RequestIdentity.of(endpoint=EP, payload={"seed": 1, "prompt": "a fox"}, base_url=BASE)
    canonical = json.dumps(
        {"base_url": BASE, "endpoint": EP, "payload": {"prompt": "a fox", "seed": 1}},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert identity.fingerprint == hashlib.sha256(canonical.encode()).hexdigest()
    # Key order, a trailing slash on the base URL and slashes around the endpoint do not matter.
    same = RequestIdentity.of(endpoint=f"/{EP}/", payload={"prompt": "a fox", "seed": 1}, base_url=BASE + "/")
    assert same == identity


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        ({"payload": {"prompt": "a cat", "seed": 1}}, ["prompt"]),
        ({"payload": {"prompt": "a fox"}}, ["seed"]),
        ({"payload": {"prompt": "a fox", "seed": 1, "num_images": 2}}, ["num_images"]),
        ({"endpoint": "fal-ai/flux-pro/kontext/max/text-to-image"}, ["endpoint"]),
        ({"base_url": "https://aggregator.example"}, ["base_url"]),
        ({"payload": {"prompt": "a fox", "seed": "1"}}, ["seed"]),  # 1 and "1" are different requests
    ],
)
def test_any_change_changes_the_fingerprint_and_names_the_field(change, differs):
    args = {"endpoint": EP, "payload": {"prompt": "a fox", "seed": 1}, "base_url": BASE}
    first = RequestIdentity.of(**args)
    other = RequestIdentity.of(**{**args, **change})
    assert other.fingerprint != first.fingerprint
    assert other.differing_fields(first) == differs


def test_the_record_holds_digests_not_values():
    identity = RequestIdentity.of(endpoint=EP, payload={"prompt": "a secret product launch"}, base_url=BASE)
    record = StoredRequest(handle={"request_id": "r1"}, identity=identity, max_tries=1, try_number=1)
    dumped = json.dumps(record.model_dump(mode="json"))
    assert "secret product" not in dumped
    assert StoredRequest.load(json.loads(dumped)) == record
    # An older version's bare handle is not a record.
    assert StoredRequest.load({"request_id": "r1", "status_url": "x"}) is None
    assert StoredRequest.load(None) is None


def test_connection_of_a_handle():
    assert conn_id_for({"request_id": "r"}, None) == ("flux_default", None)
    assert conn_id_for({"request_id": "r", "flux_conn_id": "team_a"}, None) == ("team_a", None)
    assert conn_id_for({"request_id": "r", "flux_conn_id": "team_a"}, "team_a") == ("team_a", None)
    conn, warning = conn_id_for({"request_id": "r", "flux_conn_id": "team_a"}, "team_b")
    assert conn == "team_b" and warning and "'team_a'" in warning and "'team_b'" in warning
    assert conn_id_for({"request_id": "r"}, "team_b") == ("team_b", None)


def test_coerce_handle_accepts_the_usual_forms_and_names_the_field_otherwise():
    assert coerce_handle("abc") == {"request_id": "abc"}
    assert coerce_handle('{"request_id": "abc"}') == {"request_id": "abc"}
    with pytest.raises(FluxValidationError, match="request: expected the submit task's output"):
        coerce_handle(42)
