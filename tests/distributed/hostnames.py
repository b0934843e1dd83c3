"""``[core] hostname_callable`` of the distributed tests' Airflow processes.

Both triggerers run on this one machine; a hostname of their own (from the environment)
tells the test which triggerer a ``job`` row, and so a trigger row, belongs to.
"""

from __future__ import annotations

import os
import socket


def from_env() -> str:
    return os.environ.get("FLUX_TEST_HOSTNAME") or socket.getfqdn()
