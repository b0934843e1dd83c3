"""Issue #22's measured case, re-run: a copy whose ``source`` comes from the DAG run's conf.

Real DAG runs (dag.test) against the emulator (the connection's host), moto (S3) and
:class:`~tests.origin.Origin` servers standing in for other hosts on this machine.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import TOKEN, task_states, xcom
from tests.origin import Answer, Origin, jpeg

pytestmark = pytest.mark.usefixtures("airflow_db")


def _source(url: str) -> dict:
    """A result as an upstream (or an attacker's conf) would hand it: one image at ``url``."""
    return {"request_id": "req-conf", "seed": 1, "images": [{"url": url, "content_type": "image/jpeg"}]}


def _copy(dags, s3, url: str):
    return dags.get_dag("flux_test_copy_from_conf").test(run_conf={"source": _source(url), "bucket": s3.bucket})


def _connection(monkeypatch, emulator, **extra) -> None:
    conn = {"conn_type": "flux", "host": emulator.base_url, "password": TOKEN, "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_FLUX_DEFAULT", json.dumps(conn))


def _nothing_in(s3) -> bool:
    return not s3.list_objects_v2(Bucket=s3.bucket).get("Contents") and not s3.list_multipart_uploads(
        Bucket=s3.bucket
    ).get("Uploads")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_an_unknown_host_in_the_conf_is_never_contacted(dags, flux_default, s3, capfd, host):
    with Origin() as unknown:
        url = unknown.serve("/latest/meta-data/iam", Answer(body=jpeg(500))).replace("127.0.0.1", host)
        dr = _copy(dags, s3, url)
        assert dr.state == "failed", task_states(dr)
        assert unknown.requests == []
        out = capfd.readouterr().out
        assert f"Refusing to download an image from '{host}:{unknown.port}'" in out
        assert "allowed_image_hosts" in out and "'flux_default'" in out
        assert _nothing_in(s3)


def test_a_host_listed_in_allowed_image_hosts_is_copied(dags, emulator, monkeypatch, s3):
    with Origin() as listed:
        _connection(monkeypatch, emulator, allowed_image_hosts=listed.netloc)
        body = jpeg(40_000)
        dr = _copy(dags, s3, listed.serve("/img.jpg", Answer(body=body)))
        assert dr.state == "success", task_states(dr)
        assert listed.requests == [("GET", "/img.jpg")]
        (uri,) = xcom(dr, "to_s3")
        key = uri.split("/", 3)[3]
        assert s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == body


def test_a_redirect_to_a_host_not_listed_is_refused_without_contacting_it(dags, emulator, monkeypatch, s3, capfd):
    with Origin() as listed, Origin() as internal:
        _connection(monkeypatch, emulator, allowed_image_hosts=listed.netloc)
        secret = internal.serve("/secret", Answer(body=jpeg(500)))
        dr = _copy(dags, s3, listed.serve("/hop", Answer(status=302, location=secret)))
        assert dr.state == "failed", task_states(dr)
        assert listed.requests == [("GET", "/hop")]
        assert internal.requests == []
        assert f"Refusing to download an image from '{internal.netloc}'" in capfd.readouterr().out
        assert _nothing_in(s3)


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "no-content-length"])
def test_an_image_over_the_cap_fails_and_stores_nothing(dags, emulator, monkeypatch, s3, capfd, with_length):
    with Origin() as listed:
        _connection(monkeypatch, emulator, allowed_image_hosts=listed.netloc, max_image_mib=1)
        answer = Answer(body=jpeg(3 << 20)) if with_length else Answer(endless=True)
        dr = _copy(dags, s3, listed.serve("/big.jpg", answer))
        assert dr.state == "failed", task_states(dr)
        out = capfd.readouterr().out
        assert "over the 1 MiB cap of connection 'flux_default'" in out and "max_image_mib" in out
        # Nothing stored, no multipart upload left behind (an unknown size goes multipart).
        assert _nothing_in(s3)


def test_the_emulators_own_images_are_still_copied(dags, flux_default, s3):
    # The connection's host serves the images (as fal's CDN would): allowed without listing.
    dr = dags.get_dag("flux_test_to_s3").test(
        run_conf={
            "prompt": "an allowed fox",
            "num_images": 1,
            "sync_mode": False,
            "nsfw": "skip",
            "prefix": "own",
            "key_template": "{request_id}_{index}.{ext}",
            "aspect_ratio": "1:1",
            "bucket": s3.bucket,
        }
    )
    assert dr.state == "success", task_states(dr)
    assert len(flux_default.calls(kind="cdn")) == 1


def test_a_result_is_downloaded_under_the_connection_it_names(dags, emulator, make_flux_conn, monkeypatch, s3, capfd):
    # As a handle does, a result names the connection it was made with; only a flux
    # connection lends its hosts (another type's host, an internal API's, stays unreachable).
    with Origin() as listed, Origin() as internal:
        conn = make_flux_conn(emulator.base_url, allowed_image_hosts=listed.netloc)
        other_type = "internal_api"
        monkeypatch.setenv(
            "AIRFLOW_CONN_INTERNAL_API",
            json.dumps(
                {"conn_type": "http", "host": internal.base_url, "extra": {"allowed_image_hosts": internal.netloc}}
            ),
        )
        body = jpeg(1000)
        source = {**_source(listed.serve("/a.jpg", Answer(body=body))), "flux_conn_id": conn}
        dr = dags.get_dag("flux_test_copy_from_conf").test(run_conf={"source": source, "bucket": s3.bucket})
        assert dr.state == "success", task_states(dr)
        assert listed.requests == [("GET", "/a.jpg")]

        source = {**_source(internal.serve("/secret", Answer(body=body))), "flux_conn_id": other_type}
        dr = dags.get_dag("flux_test_copy_from_conf").test(run_conf={"source": source, "bucket": s3.bucket})
        assert dr.state == "failed", task_states(dr)
        assert internal.requests == []
        assert f"Refusing to download an image from '{internal.netloc}'" in capfd.readouterr().out


def test_a_generated_result_names_its_connection_and_is_copied_under_it(dags, emulator, make_flux_conn, s3):
    # flux_default is not the API here: the copy follows the connection the result records.
    with Origin() as elsewhere:
        conn = make_flux_conn(emulator.base_url)
        make_flux_conn(elsewhere.base_url, conn_id="flux_default")
        dr = dags.get_dag("flux_test_generate_on_a_connection_then_copy").test(
            run_conf={"conn": conn, "bucket": s3.bucket}
        )
        assert dr.state == "success", task_states(dr)
        assert xcom(dr, "generate")["flux_conn_id"] == conn
        assert len(xcom(dr, "to_s3")) == 1
        assert len(emulator.calls(kind="cdn")) == 1
        assert elsewhere.requests == []


def test_a_failed_copy_with_replace_deletes_only_the_objects_it_created(emulator, monkeypatch, s3):
    """``replace=True``, three images: the first overwrites an object that was there, the second
    creates one, the third fails. The rollback deletes the created one only: the overwritten key
    keeps an image (this try's) instead of vanishing with what it held before."""
    from types import SimpleNamespace

    from airflow_flux.exceptions import FluxError
    from airflow_flux.transfers import FluxToS3Operator

    with Origin() as listed:
        _connection(monkeypatch, emulator, allowed_image_hosts=listed.netloc)
        new = [jpeg(3000), jpeg(4000)]
        urls = [listed.serve(f"/{i}.jpg", Answer(body=body)) for i, body in enumerate(new)]
        urls.append(listed.serve("/gone.jpg", Answer(status=404)))
        s3.put_object(Bucket=s3.bucket, Key="mixed/0.jpg", Body=b"what was there before")
        source = {
            "request_id": "req-mixed",
            "seed": 1,
            "images": [{"url": u, "content_type": "image/jpeg"} for u in urls],
        }
        op = FluxToS3Operator(
            task_id="to_s3",
            source=source,
            s3_bucket=s3.bucket,
            s3_key_prefix="mixed",
            image_key_template="{index}.{ext}",
            replace=True,
        )
        with pytest.raises(FluxError, match=r"Copy of 1 image\(s\) failed"):
            op.execute({"ti": SimpleNamespace(dag_id="d", run_id="r", task_id="to_s3", map_index=-1)})
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket).get("Contents", [])}
    assert keys == {"mixed/0.jpg"}, keys
    assert s3.get_object(Bucket=s3.bucket, Key="mixed/0.jpg")["Body"].read() == new[0]
