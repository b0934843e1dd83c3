"""The prefix's manifest: merged by each writer under an S3 precondition (moto server), version 1 still read."""

from __future__ import annotations

import json
import threading

import pytest

from airflow_flux.exceptions import FluxImageExistsError
from airflow_flux.manifest import MANIFEST_VERSION, Manifest, ManifestImage, merge
from airflow_flux.manifest_store import merge_manifest

KEY = "shared/manifest.json"


def _part(task_id: str, *keys: str, run_id: str = "run1", status: str = "copied", cost: float = 0.04) -> Manifest:
    """One writer's own part, as a copy task builds it."""
    images = [
        ManifestImage(status=status, key=key, index=0, request_id=key.rsplit("/", 1)[-1], sha256="0" * 64)
        for key in keys
    ]
    return Manifest(
        created_at="2026-12-01T00:00:00+00:00",
        dag_id="dag",
        run_id=run_id,
        task_id=task_id,
        map_index=-1,
        bucket="b",
        prefix="shared",
        images=images,
        cost_usd=cost * len(keys),
    )


def _listed(manifest: Manifest) -> list[tuple[str | None, str | None]]:
    return [(i.task_id, i.key) for i in manifest.images]


def test_writers_keep_each_others_entries_and_a_retry_replaces_its_own_in_place():
    a = merge(None, _part("a", "shared/a1.jpg", "shared/a2.jpg"))
    ab = merge(a, _part("b", "shared/b1.jpg"))
    assert _listed(ab) == [("a", "shared/a1.jpg"), ("a", "shared/a2.jpg"), ("b", "shared/b1.jpg")]
    assert [w.task_id for w in ab.writers] == ["a", "b"]
    assert ab.cost_usd == pytest.approx(0.12)
    assert (ab.version, ab.task_id) == (MANIFEST_VERSION, "b")  # the top level names the last writer

    # A retry of "a" (one image this time, reused): its entries only, where they were.
    again = merge(ab, _part("a", "shared/a1.jpg", status="reused"))
    assert _listed(again) == [("a", "shared/a1.jpg"), ("b", "shared/b1.jpg")]
    assert again.images[0].status.value == "reused"
    assert [w.task_id for w in again.writers] == ["b", "a"]
    assert again.cost_usd == pytest.approx(0.08)


def test_an_overwritten_object_is_listed_by_its_new_writer_only():
    ab = merge(merge(None, _part("a", "shared/x.jpg", "shared/a2.jpg")), _part("b", "shared/b1.jpg"))
    # "c" copied over x.jpg (replace=True): a's entry for it lists an object that is gone.
    abc = merge(ab, _part("c", "shared/x.jpg"))
    assert _listed(abc) == [("a", "shared/a2.jpg"), ("b", "shared/b1.jpg"), ("c", "shared/x.jpg")]
    # "d" found its very image at b1.jpg and left it (reused): both list it.
    abcd = merge(abc, _part("d", "shared/b1.jpg", status="reused"))
    assert [k for _, k in _listed(abcd)].count("shared/b1.jpg") == 2
    # A writer all of whose entries were overwritten no longer counts.
    only_c = merge(merge(None, _part("a", "shared/x.jpg")), _part("c", "shared/x.jpg"))
    assert [w.task_id for w in only_c.writers] == ["c"]


def version_1(bucket: str = "b") -> dict:
    """A version-1 manifest (one writer, at the top level only), as an older airflow-flux wrote."""
    return {
        "version": 1,
        "created_at": "2026-01-01T00:00:00+00:00",
        "dag_id": "old_dag",
        "run_id": "old_run",
        "task_id": "to_s3",
        "map_index": 2,
        "bucket": bucket,
        "prefix": "shared",
        "images": [{"status": "copied", "key": "shared/old.jpg", "index": 0}],
        "cost_usd": 0.04,
    }


def test_a_version_1_manifest_reads_as_one_writers():
    manifest = Manifest.model_validate(version_1())
    assert manifest.images[0].writer == ("old_dag", "old_run", "to_s3", 2)
    assert [(w.task_id, w.cost_usd) for w in manifest.writers] == [("to_s3", 0.04)]
    merged = merge(manifest, _part("b", "shared/b1.jpg"))
    assert _listed(merged) == [("to_s3", "shared/old.jpg"), ("b", "shared/b1.jpg")]
    assert merged.cost_usd == pytest.approx(0.08)


def _read(s3) -> dict:
    return json.loads(s3.get_object(Bucket=s3.bucket, Key=KEY)["Body"].read())


def _on(s3, part: Manifest) -> Manifest:
    return part.model_copy(update={"bucket": s3.bucket})


class _Interleaving:
    """A client that stops its writer right after its first read of the manifest and lets another
    writer read, merge and write completely before it goes on: the race, every time."""

    def __init__(self, client, other_writer) -> None:
        self._client, self._other = client, other_writer
        self.puts: list[str] = []

    def get_object(self, **kwargs):
        try:
            return self._client.get_object(**kwargs)  # found, or NoSuchKey: a read either way
        finally:
            if self._other is not None:
                other, self._other = self._other, None
                thread = threading.Thread(target=other)
                thread.start()
                thread.join(timeout=60)

    def put_object(self, **kwargs):
        try:
            answer = self._client.put_object(**kwargs)
        except Exception as exc:
            self.puts.append(type(exc).__name__ + ":" + str(exc.response["Error"]["Code"]))
            raise
        self.puts.append("ok")
        return answer


@pytest.mark.parametrize("existing", [False, True], ids=["new-manifest", "existing-manifest"])
def test_two_writers_racing_for_the_manifest_lose_nothing(s3, existing):
    if existing:
        merge_manifest(s3, _on(s3, _part("first", "shared/first.jpg")), KEY)
    done: list[Manifest] = []
    b = _on(s3, _part("b", "shared/b1.jpg"))
    racing = _Interleaving(s3, lambda: done.append(merge_manifest(s3, b, KEY)))
    a = _on(s3, _part("a", "shared/a1.jpg"))
    merged = merge_manifest(racing, a, KEY)

    assert len(done) == 1, "the other writer ran in between"
    # a read before b wrote, so S3 refused a's first write (If-None-Match / If-Match); a merged again.
    assert racing.puts == ["ClientError:PreconditionFailed", "ok"]
    expected = [*(["shared/first.jpg"] if existing else []), "shared/b1.jpg", "shared/a1.jpg"]
    assert [i["key"] for i in _read(s3)["images"]] == expected
    assert [i.key for i in merged.images] == expected


def test_a_retried_writer_does_not_duplicate_its_entries(s3):
    merge_manifest(s3, _on(s3, _part("a", "shared/a1.jpg")), KEY)
    merge_manifest(s3, _on(s3, _part("b", "shared/b1.jpg")), KEY)
    merge_manifest(s3, _on(s3, _part("a", "shared/a1.jpg", status="reused")), KEY)
    manifest = _read(s3)
    assert [(i["task_id"], i["status"]) for i in manifest["images"]] == [("a", "reused"), ("b", "copied")]
    assert manifest["version"] == MANIFEST_VERSION


@pytest.mark.parametrize(
    ("body", "problem"),
    [(b"not json", "not a manifest"), (b'{"version": 99, "images": []}', "a version-99 manifest")],
)
def test_an_object_that_is_not_a_manifest_is_refused_unless_replace(s3, body, problem):
    s3.put_object(Bucket=s3.bucket, Key=KEY, Body=body)
    with pytest.raises(FluxImageExistsError, match=rf"s3://{s3.bucket}/{KEY}: {problem}"):
        merge_manifest(s3, _on(s3, _part("a", "shared/a1.jpg")), KEY)
    assert s3.get_object(Bucket=s3.bucket, Key=KEY)["Body"].read() == body
    merge_manifest(s3, _on(s3, _part("a", "shared/a1.jpg")), KEY, replace=True)
    assert [i["key"] for i in _read(s3)["images"]] == ["shared/a1.jpg"]
