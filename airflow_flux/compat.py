"""What the running Airflow release has: one place for the differences between 3.1, 3.2 and 3.3.

Each name says what a feature needs, so a caller reads ``if HAS_TASK_STATE_STORE`` rather
than a version number. Nothing heavy is imported (this runs while DAG files are parsed).
"""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

#: The installed Airflow release (its core; the ``apache-airflow`` meta package may be absent).
AIRFLOW_VERSION = Version(Version(version("apache-airflow-core")).base_version)

#: ``context["task_state_store"]``: per task instance state that survives retries (3.3).
HAS_TASK_STATE_STORE = AIRFLOW_VERSION.release[:2] >= (3, 3)


async def amask_secret(value: str) -> None:
    """Mask ``value`` in every log, from the triggerer's event loop.

    3.3 has ``airflow.sdk.log.amask_secret`` (it tells the supervisor without blocking the
    loop). Before, the trigger runner's own masker is told: its trigger logs are written by
    this process, and a blocking call to the supervisor from the loop is what 3.3 avoids.

    :param value: the secret.
    """
    try:
        from airflow.sdk.log import amask_secret as amask
    except ImportError:
        from airflow.sdk._shared.secrets_masker import mask_secret

        mask_secret(value)
    else:
        await amask(value)
