"""The API-server calls (REST v2) that both the demo UI mode and tests/system make."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from collections.abc import Callable


class AirflowApi:
    """Reads, health, parse state and waiting, against a local API server.

    Subclasses set ``url`` (the API server), ``session`` and ``dag_id``, and say how their
    processes are checked (:meth:`check_alive`) and what their failures raise (:meth:`failure`).
    """

    url: str
    session: requests.Session
    dag_id: str

    def check_alive(self) -> None:
        raise NotImplementedError

    def failure(self, message: str) -> Exception:
        raise NotImplementedError

    def get(self, path: str, **params: Any) -> Any:
        resp = self.session.get(f"{self.url}/api/v2/{path}", params=params, timeout=10)
        resp.raise_for_status()
        return resp.json()

    def wait_until(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        """``check()`` until it returns something truthy; errors of the API count as not yet."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                last = check()
            except (requests.RequestException, ValueError) as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(interval)
        raise self.failure(f"Timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")

    def healthy(self) -> bool:
        health = self.get("monitor/health")
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all(health.get(part, {}).get("status") == "healthy" for part in parts)

    def dag_parsed(self) -> bool:
        errors = self.get("importErrors")["import_errors"]
        if errors:
            raise self.failure(f"DAG import errors: {errors}")
        return self.session.get(f"{self.url}/api/v2/dags/{self.dag_id}", timeout=10).status_code == 200
