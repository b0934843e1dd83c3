"""What a pipeline run produced: read back from S3 (the manifest), checked, downloaded, printed.

Shared by ``make demo`` (task instances from ``dag.test()``) and ``make demo-ui``
(task instances from the REST API): both hand over the same shape of task instance
dicts (``task_id``, ``map_index``, ``state``, ``start_date``, ``end_date`` and, for the
prompts and wait tasks, ``return_value``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

#: A file in the output folder that says the folder is the demo's to empty.
MARKER = ".flux-demo-output"
#: What the summary of a run on the emulator says about its images.
EMULATOR_NOTICE = (
    "Note: these images come from the fal queue emulator: labelled placeholders (coloured shapes",
    "with the prompt and seed written on them), not FLUX renderings. The same DAG makes real ones",
    "on the real API (every prompt is a paid request; S3 stays local; make demo-ui takes the same):",
    '  FLUX_DEMO_REAL=1 FLUX_API_TOKEN="$FAL_KEY" make demo                                   # fal direct',
    '  FLUX_DEMO_REAL=1 FLUX_API_TOKEN="$TOKEN" FLUX_API_BASE=https://<aggregator> make demo  # an aggregator',
)


@dataclass
class ImageRow:
    """One image of the run, as the manifest lists it and as checked here."""

    number: int
    prompt: str
    request_id: str
    status: str  # copied | reused | skipped | missing
    s3_uri: str | None = None
    size: int | None = None
    waited_seconds: float | None = None  # from the end of the submit to the result in hand
    deferred_seconds: float | None = None  # time in the triggerer (0: done at the first check)
    copy_seconds: float | None = None
    local_path: str | None = None
    picture: str | None = None  # e.g. "1248x832 JPEG", as Pillow reads the downloaded file
    problem: str | None = None

    @property
    def landed(self) -> bool:
        return self.status in ("copied", "reused") and self.problem is None and self.local_path is not None


@dataclass
class Summary:
    """The outcome of one demo run; ``ok`` only if every image landed."""

    mode: str
    dag_id: str
    run_id: str | None
    state: str
    bucket: str
    expected: int
    images: list[ImageRow] = field(default_factory=list)
    manifest_uri: str | None = None
    output_dir: str | None = None
    seconds: float | None = None
    task_states: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # process groups the demo started (all stopped)
    emulator: bool = False  # the images came from the fal queue emulator (placeholders)

    @property
    def landed(self) -> int:
        return sum(row.landed for row in self.images)

    @property
    def ok(self) -> bool:
        return (
            self.state == "success"
            and self.expected > 0
            and self.landed == self.expected == len(self.images)
            and not self.problems
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "landed": self.landed}

    def render(self) -> str:
        took = f", {self.seconds:.1f}s" if self.seconds is not None else ""
        lines = [
            f"{self.dag_id}  run {self.run_id}  {self.state.upper()}  ({self.mode}{took})",
            f"{self.landed} of {self.expected} image(s) landed in s3://{self.bucket}/"
            + (f" and in {self.output_dir}/" if self.output_dir else ""),
        ]
        if self.manifest_uri:
            lines.append(f"manifest: {self.manifest_uri}")
        if self.images:
            lines += ["", f"  #  {'prompt':<44} {'request id':<36} {'size':>8} {'waited':>7} {'deferred':>9}"]
        for row in self.images:
            lines.append(
                f"{row.number:>3}  {_cut(row.prompt, 44):<44} {row.request_id:<36} {_size(row.size):>8} "
                f"{_secs(row.waited_seconds):>7} {_secs(row.deferred_seconds):>9}"
            )
            lines.append(f"     {row.s3_uri or '(not in S3: ' + row.status + ')'}")
            if row.local_path:
                lines.append(f"     -> {row.local_path}" + (f"  ({row.picture})" if row.picture else ""))
            if row.problem:
                lines.append(f"     !! {row.problem}")
        if self.images:
            lines += [
                "",
                "waited: seconds from the submit to the result in hand; deferred: seconds the wait spent",
                "in the triggerer, holding no worker slot (0.0: the image was ready at the first check).",
            ]
        failed = {k: v for k, v in self.task_states.items() if v != "success"}
        if failed:
            lines.append(f"tasks not successful: {failed}")
        lines += [f"!! {p}" for p in self.problems]
        if self.emulator and self.images:
            # Said every time: someone who asked for a red fox and finds coloured shapes
            # should know why before opening the folder.
            lines += ["", *EMULATOR_NOTICE]
        lines.append("OK: every image landed." if self.ok else "NOT OK: see the lines marked !! above.")
        return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    return f"{size / 1024:.1f} kB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.1f} MB"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def slug(text: str, limit: int = 48) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


def prepare_output(output_dir: Path) -> None:
    """Empty the output folder of the previous demo run (each run replaces the last one's images).

    Refuses a non-empty folder the demo did not create, so ``--output ~/Pictures`` loses nothing.
    """
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f"{output_dir} exists and is not a folder")
        if any(output_dir.iterdir()) and not (output_dir / MARKER).exists():
            raise FileExistsError(
                f"{output_dir} is not empty and was not made by the demo ({MARKER} missing): "
                "choose another --output or empty it"
            )
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    (output_dir / MARKER).write_text("Made by airflow-flux's demo; emptied by its next run.\n")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _value(raw: Any) -> Any:
    """An XCom value as the REST API may return it (JSON text) or as Python has it."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def wait_timings(task_instances: list[dict[str, Any]]) -> dict[str, tuple[float | None, float | None]]:
    """request_id -> (waited, deferred) seconds, from the wait (or generate) task instances."""
    submit_end = {ti["map_index"]: parse_time(ti.get("end_date")) for ti in task_instances if ti["task_id"] == "submit"}
    timings: dict[str, tuple[float | None, float | None]] = {}
    for ti in task_instances:
        if ti["task_id"] not in ("wait", "generate"):
            continue
        result = _value(ti.get("return_value"))
        if not isinstance(result, dict) or not result.get("request_id"):
            continue
        end = parse_time(ti.get("end_date"))
        # generate submits itself: its wait starts with the task.
        began = submit_end.get(ti["map_index"]) if ti["task_id"] == "wait" else parse_time(ti.get("start_date"))
        waited = round((end - began).total_seconds(), 1) if end and began else None
        deferred = result.get("waited_seconds")
        timings[result["request_id"]] = (waited, float(deferred) if deferred is not None else 0.0)
    return timings


def prompts_of(task_instances: list[dict[str, Any]]) -> list[str] | None:
    for ti in task_instances:
        if ti["task_id"] == "load_prompts":
            value = _value(ti.get("return_value"))
            return list(value) if isinstance(value, list) else None
    return None


def find_manifest(s3: Any, bucket: str, dag_id: str, run_id: str) -> tuple[str, dict[str, Any]] | None:
    """The manifest FluxToS3Operator wrote for this run, with only this run's entries.

    A manifest may be shared by several tasks and runs (each entry names its writer), so it
    is found, and read, by its entries' writers, not by who wrote it last.
    """
    from airflow_flux.manifest import entry_writer

    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("manifest.json"):
                continue
            manifest = json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            ours = [
                e
                for e in manifest.get("images") or []
                if isinstance(e, dict) and (entry_writer(e, manifest) or ("", ""))[:2] == (dag_id, run_id)
            ]
            if ours:
                return obj["Key"], {**manifest, "images": ours}
    return None


def summarize(
    *,
    s3: Any,
    bucket: str,
    dag_id: str,
    run_id: str | None,
    state: str,
    task_instances: list[dict[str, Any]],
    output_dir: Path | None,
    mode: str,
    emulator: bool,
    seconds: float | None = None,
) -> Summary:
    """Check the run's images in S3 against its manifest and download them into ``output_dir``.

    ``emulator``: the images come from the fal queue emulator (the summary says they are placeholders).
    """
    from PIL import Image

    prompts = prompts_of(task_instances)
    waits = [ti for ti in task_instances if ti["task_id"] in ("wait", "generate")]
    summary = Summary(
        mode=mode,
        dag_id=dag_id,
        run_id=run_id,
        state=state,
        bucket=bucket,
        expected=len(prompts) if prompts is not None else len(waits),
        output_dir=str(output_dir) if output_dir else None,
        seconds=seconds,
        emulator=emulator,
        task_states={
            (f"{ti['task_id']}[{ti['map_index']}]" if ti["map_index"] >= 0 else ti["task_id"]): str(ti["state"])
            for ti in task_instances
        },
    )
    found = find_manifest(s3, bucket, dag_id, run_id) if run_id else None
    if found is None:
        summary.problems.append(f"no manifest.json of run {run_id} in s3://{bucket}/")
        return summary
    key, manifest = found
    summary.manifest_uri = f"s3://{bucket}/{key}"
    timings = wait_timings(task_instances)
    for number, entry in enumerate(manifest["images"], start=1):
        waited, deferred = timings.get(entry["request_id"], (None, None))
        row = ImageRow(
            number=number,
            prompt=entry.get("prompt") or "",
            request_id=entry["request_id"],
            status=entry["status"],
            s3_uri=entry.get("s3_uri"),
            size=entry.get("size"),
            waited_seconds=waited,
            deferred_seconds=deferred,
            copy_seconds=entry.get("copy_seconds"),
        )
        summary.images.append(row)
        if not row.s3_uri:
            row.problem = f"not copied ({entry['status']}: {entry.get('reason')})"
            continue
        body = s3.get_object(Bucket=bucket, Key=entry["key"])["Body"].read()
        if row.size is None:
            row.size = len(body)  # reused by a retry: the manifest has no size for it
        elif len(body) != row.size:
            row.problem = f"S3 object has {len(body)} bytes, the manifest says {row.size}"
            continue
        if entry.get("sha256") and hashlib.sha256(body).hexdigest() != entry["sha256"]:
            row.problem = "S3 object's SHA-256 differs from the manifest's"
            continue
        try:
            with Image.open(io.BytesIO(body)) as picture:
                picture.load()
                row.picture = f"{picture.width}x{picture.height} {picture.format}"
        except Exception as exc:  # any decoding error means "not an image"
            row.problem = f"not a readable image: {exc}"
            continue
        if output_dir is not None:
            path = output_dir / f"{number:02d}-{slug(row.prompt)}{Path(entry['key']).suffix}"
            path.write_bytes(body)
            row.local_path = str(path)
    if output_dir is not None:
        (output_dir / "summary.json").write_text(
            json.dumps({"summary": summary.to_json(), "manifest": manifest}, indent=2, default=str)
        )
    return summary
