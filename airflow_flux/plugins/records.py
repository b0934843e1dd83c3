"""What the metadata DB records of a run's images: which manifests its copy tasks wrote.

A ``FluxToS3Operator`` task pushes its manifest's ``s3://`` URI as the XCom ``flux_manifest``
(:data:`~airflow_flux.xcom_keys.MANIFEST_XCOM_KEY`). An XCom can be edited through the REST
API, so it is not taken on its word: the task's own record is its rendered fields
(``RenderedTaskInstanceFields``, written by the task's worker, not editable through the API).
A manifest is read only when the XCom names the very manifest those fields say the task wrote
(``s3_bucket``, ``s3_key_prefix``, ``manifest_name``), with the connection they name
(``aws_conn_id``). An edit's ``s3://`` input is shown only when a task of the run named that
object in its rendered fields. A run whose rendered fields are no longer kept
(``[core] max_num_rendered_ti_fields_per_task``) shows why, not its images.

Reading the manifests themselves, and their images, is :mod:`airflow_flux.plugins.store`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from airflow_flux.identity import split_s3_input
from airflow_flux.xcom_keys import MANIFEST_XCOM_KEY

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from sqlalchemy.orm import Session

DEFAULT_CONN_ID = "aws_default"


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value (rendered fields), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


@dataclass(frozen=True)
class ManifestRef:
    """One copy task's manifest: which task wrote it, where it is, and the connection to read it.

    ``bucket`` and ``prefix`` are where the task's rendered fields say it wrote; ``refused``
    says why the manifest is not read (None: it is the one the task wrote).
    """

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    uri: str
    conn_id: str
    bucket: str = ""
    prefix: str = ""
    refused: str | None = None

    @property
    def task_label(self) -> str:
        return f"{self.task_id}[{self.map_index}]" if self.map_index >= 0 else self.task_id


class RunRecords:
    """Queries of the metadata DB for the gallery: runs with images and their manifests.

    :param default_conn_id: connection for tasks whose own ``aws_conn_id`` is not on record.
    """

    def __init__(self, default_conn_id: str = DEFAULT_CONN_ID) -> None:
        self.default_conn_id = default_conn_id

    def manifest_refs(self, session: Session, dag_id: str, run_ids: Sequence[str]) -> dict[str, list[ManifestRef]]:
        """The manifests the copy tasks of these runs recorded, per run, in task order.

        :param session: a metadata DB session.
        :param dag_id: the DAG.
        :param run_ids: its runs.
        """
        from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
        from airflow.models.xcom import XComModel

        if not run_ids:
            return {}
        rows = session.execute(
            select(XComModel.run_id, XComModel.task_id, XComModel.map_index, XComModel.value)
            .where(XComModel.dag_id == dag_id, XComModel.run_id.in_(run_ids), XComModel.key == MANIFEST_XCOM_KEY)
            .order_by(XComModel.task_id, XComModel.map_index)
        ).all()
        # The task's own record of where it wrote and with which connection: its rendered
        # fields (kept for the latest runs of each task, [core] max_num_rendered_ti_fields_per_task).
        rendered = {
            (r.run_id, r.task_id, r.map_index): r.rendered_fields
            for r in session.execute(
                select(RTIF.run_id, RTIF.task_id, RTIF.map_index, RTIF.rendered_fields).where(
                    RTIF.dag_id == dag_id, RTIF.run_id.in_(run_ids)
                )
            )
        }
        refs: dict[str, list[ManifestRef]] = {run_id: [] for run_id in run_ids}
        for row in rows:
            uri = XComModel.deserialize_value(row)
            if not isinstance(uri, str) or not uri.startswith("s3://"):
                continue
            ref = ManifestRef(
                dag_id=dag_id,
                run_id=row.run_id,
                task_id=row.task_id,
                map_index=row.map_index,
                uri=uri,
                conn_id=self.default_conn_id,
            )
            refs[row.run_id].append(self._checked(ref, rendered.get((row.run_id, row.task_id, row.map_index))))
        return refs

    def _checked(self, ref: ManifestRef, fields: Any) -> ManifestRef:
        """``ref`` with the bucket, prefix and connection of the task's record, or refused."""
        if not isinstance(fields, dict):
            return replace(ref, refused="the task's rendered fields are not on record, so its manifest is not read")
        bucket, prefix, name = (fields.get(k) for k in ("s3_bucket", "s3_key_prefix", "manifest_name"))
        if not (isinstance(bucket, str) and bucket and isinstance(prefix, str) and isinstance(name, str) and name):
            return replace(ref, refused="the task's rendered fields name no manifest, so none is read")
        prefix = prefix.strip("/")
        expected = f"s3://{bucket}/{prefix}/{name}" if prefix else f"s3://{bucket}/{name}"
        if ref.uri != expected:
            return replace(ref, refused=f"the XCom does not name the manifest this task wrote ({expected})")
        conn_id = fields.get("aws_conn_id")
        return replace(
            ref, bucket=bucket, prefix=prefix, conn_id=conn_id if isinstance(conn_id, str) and conn_id else ref.conn_id
        )

    @staticmethod
    def names_input(session: Session, dag_id: str, run_id: str, uri: str) -> bool:
        """Whether a task of the run named the ``s3://`` object ``uri`` in its rendered fields.

        The manifest's ``inputs`` say which objects an edit read; the run's own record says
        which ones it was given. Only those are shown, so a manifest cannot name any object.

        :param session: a metadata DB session.
        :param dag_id: the DAG.
        :param run_id: the run.
        :param uri: an input as the manifest lists it (pinned or not).
        """
        from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF

        try:
            wanted = split_s3_input(uri)[:2]
        except ValueError:
            return False
        for (fields,) in session.execute(
            select(RTIF.rendered_fields).where(RTIF.dag_id == dag_id, RTIF.run_id == run_id)
        ):
            for value in _strings(fields):
                if value.startswith("s3://"):
                    try:
                        if split_s3_input(value)[:2] == wanted:
                            return True
                    except ValueError:
                        continue
        return False

    @staticmethod
    def _has_manifest(dag_id: str) -> Any:
        from airflow.models.dagrun import DagRun
        from airflow.models.xcom import XComModel

        recorded = (
            select(XComModel.dag_run_id)
            .where(XComModel.dag_id == dag_id, XComModel.key == MANIFEST_XCOM_KEY)
            .distinct()
        )
        return (DagRun.dag_id == dag_id, DagRun.id.in_(recorded.scalar_subquery()))

    def count_runs_with_images(self, session: Session, dag_id: str) -> int:
        """How many runs of the DAG recorded a manifest.

        :param session: a metadata DB session.
        :param dag_id: the DAG.
        """
        from airflow.models.dagrun import DagRun

        return int(session.scalar(select(func.count(DagRun.id)).where(*self._has_manifest(dag_id))) or 0)

    def runs_with_images(self, session: Session, dag_id: str, *, offset: int, limit: int) -> list[Any]:
        """The DAG's runs that recorded a manifest, latest first (``run_id``, ``state``, ``run_after``).

        :param session: a metadata DB session.
        :param dag_id: the DAG.
        :param offset: runs to skip (pagination).
        :param limit: runs to return.
        """
        from airflow.models.dagrun import DagRun

        return list(
            session.execute(
                select(DagRun.run_id, DagRun.state, DagRun.run_after)
                .where(*self._has_manifest(dag_id))
                .order_by(DagRun.run_after.desc(), DagRun.id.desc())
                .offset(offset)
                .limit(limit)
            ).all()
        )

    @staticmethod
    def dags_with_images(session: Session, dag_ids: set[str] | None) -> list[tuple[str, int]]:
        """``(dag_id, runs with images)`` for the DAGs whose runs recorded manifests.

        :param session: a metadata DB session.
        :param dag_ids: only these (the ones the user may read); None for all.
        """
        from airflow.models.xcom import XComModel

        stmt = (
            select(XComModel.dag_id, func.count(func.distinct(XComModel.dag_run_id)))
            .where(XComModel.key == MANIFEST_XCOM_KEY)
            .group_by(XComModel.dag_id)
            .order_by(XComModel.dag_id)
        )
        if dag_ids is not None:
            stmt = stmt.where(XComModel.dag_id.in_(dag_ids))
        return [(str(d), int(n)) for d, n in session.execute(stmt).all()]
