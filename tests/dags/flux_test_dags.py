"""DAGs the tests run with dag.test() (which re-parses this folder, so they live at module level).

They use the ``flux_default`` connection, which each test points at its own emulator, and
take the prompt from ``params`` so a test picks an emulator fault scenario by prompt.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param

from airflow_flux.models import KONTEXT_EDIT, KONTEXT_MAX_MULTI
from airflow_flux.operators import FluxBatchGenerateOperator, FluxGenerateOperator, FluxSubmitOperator
from airflow_flux.sensors import FluxStatusSensor
from airflow_flux.state import forget_on_success
from airflow_flux.transfers import FluxToS3Operator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
PARAMS = {"prompt": Param("a red fox in the snow", type="string")}


class FlakySubmitOperator(FluxSubmitOperator):
    """Dies right after submitting on its first try, as a worker killed at the worst moment would."""

    def execute(self, context):
        handle = super().execute(context)
        if context["ti"].try_number == 1:
            raise RuntimeError("worker lost right after submit")
        return handle


def lose_worker_on_first_try(context, result=None):
    """A ``post_execute`` hook: the task fails after its submit on try 1, as a lost worker would."""
    if context["ti"].try_number == 1:
        raise RuntimeError("worker lost right after submit")


#: Renders differently on the retry: the retry must not be handed the first try's images.
CHANGED = "{{ 'first %s' if ti.try_number == 1 else 'second %s' }}"
RETRY = {"retries": 1, "retry_delay": timedelta(seconds=0), "post_execute": lose_worker_on_first_try}


with DAG("flux_test_submit_sensor", schedule=None, start_date=START, params=PARAMS, catchup=False):
    submit = FluxSubmitOperator(task_id="submit", prompt="{{ params.prompt }}", aspect_ratio="16:9", seed=11)
    FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=60)

with DAG("flux_test_generate", schedule=None, start_date=START, params=PARAMS, catchup=False):
    FluxGenerateOperator(task_id="generate", prompt="{{ params.prompt }}", poll_interval=0.2, wait_timeout=60)

with DAG("flux_test_expand", schedule=None, start_date=START, catchup=False):
    prompts = [f"mapped prompt {i}" for i in range(5)]
    submits = FluxSubmitOperator.partial(task_id="submit", output_format="png").expand(prompt=prompts)
    FluxStatusSensor.partial(task_id="wait", poll_interval=0.2, timeout=60).expand(request=submits.output)

with DAG("flux_test_timeout", schedule=None, start_date=START, params=PARAMS, catchup=False):
    # One request per sensor: a timed-out wait cancels its request.
    submit = FluxSubmitOperator(task_id="submit", prompt="{{ params.prompt }}")
    FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=2)
    submit_soft = FluxSubmitOperator(task_id="submit_soft", prompt="{{ params.prompt }}")
    FluxStatusSensor(task_id="wait_soft", request=submit_soft.output, poll_interval=0.2, timeout=2, soft_fail=True)

with DAG("flux_test_retry", schedule=None, start_date=START, params=PARAMS, catchup=False):
    submit = FlakySubmitOperator(
        task_id="submit", prompt="{{ params.prompt }}", retries=1, retry_delay=timedelta(seconds=0)
    )
    FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=60)


class VariableStateSubmitOperator(FlakySubmitOperator):
    """As on Airflow before 3.3, on any release: no ``task_state_store`` in the context, so the
    record is a Variable (airflow_flux.state), deleted once Airflow has the task's success."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.on_success_callback = [forget_on_success]  # what with_state_cleanup adds before 3.3

    def execute(self, context):
        context.pop("task_state_store", None)
        return super().execute(context)


with DAG("flux_test_retry_variable_state", schedule=None, start_date=START, params=PARAMS, catchup=False):
    submit = VariableStateSubmitOperator(
        task_id="submit", prompt="{{ params.prompt }}", retries=1, retry_delay=timedelta(seconds=0)
    )
    FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=60)

S3_PARAMS = {
    "prompt": Param("a red fox in the snow", type="string"),
    "bucket": Param("flux-test", type="string"),
    "num_images": Param(1, type="integer"),
    "sync_mode": Param(False, type="boolean"),
    "nsfw": Param("skip", type="string"),
    "prefix": Param("", type="string"),
    "key_template": Param("{request_id}_{index}.{ext}", type="string"),
    "aspect_ratio": Param("1:1", type="string"),
}

with DAG("flux_test_to_s3", schedule=None, start_date=START, params=S3_PARAMS, catchup=False):
    submit = FluxSubmitOperator(
        task_id="submit",
        prompt="{{ params.prompt }}",
        num_images="{{ params.num_images }}",
        sync_mode="{{ params.sync_mode }}",
        aspect_ratio="{{ params.aspect_ratio }}",
    )
    wait = FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=60)
    # The preferred path: the sensor's result, no extra API call.
    wait >> FluxToS3Operator(
        task_id="to_s3",
        source=wait.output,
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="{{ params.prefix or 'flux/' ~ run_id }}",
        image_key_template="{{ params.key_template }}",
        nsfw_policy="{{ params.nsfw }}",
    )

with DAG("flux_test_handle_to_s3", schedule=None, start_date=START, params=S3_PARAMS, catchup=False):
    submit = FluxSubmitOperator(task_id="submit", prompt="{{ params.prompt }}")
    wait = FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=60)
    # The handle-only path: the result is fetched from response_url.
    wait >> FluxToS3Operator(task_id="to_s3", source=submit.output, s3_bucket="{{ params.bucket }}")

with DAG("flux_test_batch_to_s3", schedule=None, start_date=START, params=S3_PARAMS, catchup=False):
    submits = FluxSubmitOperator.partial(task_id="submit").expand(prompt=["batch one", "batch two", "batch three"])
    waits = FluxStatusSensor.partial(task_id="wait", poll_interval=0.2, timeout=60).expand(request=submits.output)
    FluxToS3Operator(
        task_id="to_s3", source=waits.output, s3_bucket="{{ params.bucket }}", s3_key_prefix="batch/{{ run_id }}"
    )

with DAG("flux_test_no_triggerer", schedule=None, start_date=START, params=PARAMS, catchup=False):
    # Without a triggerer: the same waits, polled from the worker.
    FluxGenerateOperator(
        task_id="generate", prompt="{{ params.prompt }}", deferrable=False, poll_interval=0.1, wait_timeout=30
    )
    submit = FluxSubmitOperator(task_id="submit", prompt="{{ params.prompt }}")
    FluxStatusSensor(task_id="poke", request=submit.output, deferrable=False, poke_interval=0.2, timeout=30)
    FluxStatusSensor(
        task_id="reschedule", request=submit.output, deferrable=False, mode="reschedule", poke_interval=0.2, timeout=30
    )

with DAG(
    "flux_test_templated_input",
    schedule=None,
    start_date=START,
    catchup=False,
    render_template_as_native_obj=True,
    params={"input": Param({"prompt": "a fox"}, type="object")},
):
    # Every request field comes from the run's conf: validated after rendering, before any call.
    FluxSubmitOperator(
        task_id="submit",
        prompt="{{ params.input.prompt }}",
        num_images="{{ params.input.get('num_images') }}",
        guidance_scale="{{ params.input.get('guidance_scale') }}",
        aspect_ratio="{{ params.input.get('aspect_ratio') }}",
        output_format="{{ params.input.get('output_format') }}",
        safety_tolerance="{{ params.input.get('safety_tolerance') }}",
        extra_input="{{ params.input.get('extra', {}) }}",
    )

with DAG("flux_test_request_identity", schedule=None, start_date=START, catchup=False):
    # Each task fails after its submit on try 1 and is retried at once.
    changed = FluxSubmitOperator(task_id="submit_changed", prompt=CHANGED % ("cat", "cat"), **RETRY)
    FluxStatusSensor(task_id="wait_changed", request=changed.output, poll_interval=0.2, timeout=60)
    FluxGenerateOperator(task_id="generate_same", prompt="the same dog", poll_interval=0.2, wait_timeout=60, **RETRY)
    FluxGenerateOperator(
        task_id="generate_changed", prompt=CHANGED % ("dog", "dog"), poll_interval=0.2, wait_timeout=60, **RETRY
    )
    # A mapped list whose order changed between tries: map index 0 held "owl A" on try 1 and
    # "owl B" on try 2 (task state is keyed by map index, apache/airflow#72725).
    swapped = [
        "{{ 'owl A' if ti.try_number == 1 else 'owl B' }}",
        "{{ 'owl B' if ti.try_number == 1 else 'owl A' }}",
    ]
    mapped = FluxSubmitOperator.partial(task_id="submit_mapped", **RETRY).expand(prompt=swapped)
    FluxStatusSensor.partial(task_id="wait_mapped", poll_interval=0.2, timeout=60).expand(request=mapped.output)

with DAG("flux_test_team_connection", schedule=None, start_date=START, params=S3_PARAMS, catchup=False):
    # Only the submit names the connection: the wait and the copy use the handle's.
    submit = FluxSubmitOperator(task_id="submit", prompt="{{ params.prompt }}", flux_conn_id="flux_team_a")
    wait = FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=60)
    wait >> FluxToS3Operator(task_id="to_s3", source=submit.output, s3_bucket="{{ params.bucket }}")

EDIT_PARAMS = {
    "bucket": Param("flux-test", type="string"),
    "key": Param("inputs/red.png", type="string"),
    "other": Param("data:,", type="string"),
}

with DAG("flux_test_edit_from_s3", schedule=None, start_date=START, params=EDIT_PARAMS, catchup=False):
    # An edit of an image in S3: the submit presigns it, the emulator fetches it from moto.
    submit = FluxSubmitOperator(
        task_id="submit",
        endpoint=KONTEXT_EDIT,
        prompt="the same fox in winter",
        image_url="s3://{{ params.bucket }}/{{ params.key }}",
    )
    wait = FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=60)
    FluxToS3Operator(task_id="to_s3", source=wait.output, s3_bucket="{{ params.bucket }}", s3_key_prefix="edits")

with DAG("flux_test_edit_multi_retry", schedule=None, start_date=START, params=EDIT_PARAMS, catchup=False):
    # [max] multi with two inputs, in one task that dies after its submit on try 1: the retry
    # presigns anew (another URL) yet recognises its own request.
    FluxGenerateOperator(
        task_id="generate",
        endpoint=KONTEXT_MAX_MULTI,
        prompt="both foxes together",
        image_urls=["s3://{{ params.bucket }}/{{ params.key }}", "{{ params.other }}"],
        num_images=2,
        poll_interval=0.2,
        wait_timeout=60,
        **RETRY,
    )

BATCH_PARAMS = {"requests": Param(["a batch fox"], type="array"), "bucket": Param("flux-test", type="string")}
#: What every batch DAG shares: the requests and bucket come from the run's conf, as lists.
BATCH_DAG: dict[str, Any] = {
    "schedule": None,
    "start_date": START,
    "params": BATCH_PARAMS,
    "catchup": False,
    "render_template_as_native_obj": True,
}

with DAG("flux_test_batch", **BATCH_DAG):
    # One task for the whole batch, one failure allowed; the copy lists the failed one.
    batch = FluxBatchGenerateOperator(
        task_id="batch", requests="{{ params.requests }}", allow_failures=1, poll_interval=0.2, aspect_ratio="16:9"
    )
    FluxToS3Operator(
        task_id="to_s3", source=batch.output, s3_bucket="{{ params.bucket }}", s3_key_prefix="batch/{{ run_id }}"
    )

for dag_id, window in (("flux_test_batch_results", {}), ("flux_test_batch_results_window", {"max_in_flight": 3})):
    with DAG(dag_id, **BATCH_DAG):
        # The results in a JSON Lines file, a summary in XCom; the copy reads the file.
        batch = FluxBatchGenerateOperator(
            task_id="batch",
            requests="{{ params.requests }}",
            allow_failures=1,
            poll_interval=0.2,
            results_s3_bucket="{{ params.bucket }}",
            **window,
        )
        FluxToS3Operator(
            task_id="to_s3", source=batch.output, s3_bucket="{{ params.bucket }}", s3_key_prefix="batch/{{ run_id }}"
        )

with DAG("flux_test_batch_strict", **BATCH_DAG):
    FluxBatchGenerateOperator(task_id="batch", requests="{{ params.requests }}", poll_interval=0.2, wait_timeout=20)

for dag_id, window in (("flux_test_batch_retry", {}), ("flux_test_batch_retry_window", {"max_in_flight": 2})):
    with DAG(dag_id, **BATCH_DAG):
        # Dies after its wait on try 1: the retry keeps what completed and what was refused for
        # good, and pays again only for the transient failure (in one wait, or through a window's
        # checkpoints in the task state).
        FluxBatchGenerateOperator(
            task_id="batch", requests="{{ params.requests }}", allow_failures=2, poll_interval=0.2, **RETRY, **window
        )

with DAG("flux_test_shared_prefix", schedule=None, start_date=START, params=S3_PARAMS, catchup=False):
    # Two copy tasks of one run into one prefix, each merging its entries into the prefix's
    # manifest; "to_s3_a" dies after its copy on try 1, so its retry merges again.
    for name, retry in (("a", RETRY), ("b", {})):
        submit = FluxSubmitOperator(task_id=f"submit_{name}", prompt=f"{{{{ params.prompt }}}} {name}")
        wait = FluxStatusSensor(task_id=f"wait_{name}", request=submit.output, poll_interval=0.2, timeout=60)
        FluxToS3Operator(
            task_id=f"to_s3_{name}",
            source=wait.output,
            s3_bucket="{{ params.bucket }}",
            s3_key_prefix="{{ params.prefix }}",
            **retry,
        )


def replace_input_on_first_try(context, result=None):
    """``post_execute``: after try 1 paid, the input object is overwritten, then the worker is lost."""
    if context["ti"].try_number == 1:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        bucket, params = context["params"]["bucket"], context["params"]
        S3Hook(aws_conn_id="aws_default").get_conn().copy_object(
            Bucket=bucket, Key=params["key"], CopySource={"Bucket": bucket, "Key": params["other"]}
        )
        raise RuntimeError("worker lost right after submit")


with DAG("flux_test_edit_replaced_input", schedule=None, start_date=START, params=EDIT_PARAMS, catchup=False):
    # The input is replaced between the submit's two tries: try 2 must pay for an edit of the new bytes.
    submit = FluxSubmitOperator(
        task_id="submit",
        endpoint=KONTEXT_EDIT,
        prompt="the same fox in spring",
        image_url="s3://{{ params.bucket }}/{{ params.key }}",
        retries=1,
        retry_delay=timedelta(seconds=0),
        post_execute=replace_input_on_first_try,
    )
    wait = FluxStatusSensor(task_id="wait", request=submit.output, poll_interval=0.2, timeout=60)
    FluxToS3Operator(task_id="to_s3", source=wait.output, s3_bucket="{{ params.bucket }}", s3_key_prefix="replaced")

for dag_id, in_flight in (("flux_test_batch_refused", 40), ("flux_test_batch_refused_window", 8)):
    with DAG(dag_id, **BATCH_DAG):
        # A submit refused for good stops the batch; the retry pays only for what was never
        # paid for (all 40 submitted at once, or 8 at a time).
        FluxBatchGenerateOperator(
            task_id="batch",
            requests="{{ params.requests }}",
            poll_interval=0.2,
            retries=1,
            retry_delay=timedelta(seconds=0),
            max_in_flight=in_flight,
        )
