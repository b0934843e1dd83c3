"""A local stand-in for fal's queue API serving the FLUX.1 Kontext family.

Text-to-image, edit (``image_url``) and multi (``image_urls``), [pro] and [max]: edit
inputs are fetched the way fal fetches them, and outputs are derived from them.

Start it in-process with :class:`FluxEmulator` (tests) or as a process with
``python -m airflow_flux.emulator`` (demos). ``FluxEmulator(concurrency=N)``
(``--concurrency N``) limits each account (``Authorization`` header value) to N jobs
IN_PROGRESS at once, as fal does; the others wait IN_QUEUE in submit order with a falling
``queue_position`` (default: no limit). The server module (aiohttp) and Pillow are
imported only when first used so that importing ``airflow_flux`` stays light.

The emulator is independent of the client code it checks, so a bug in one cannot hide in
the other: nothing here imports ``airflow_flux.models``, ``airflow_flux.hooks``,
``airflow_flux.identity`` or anything else outside ``airflow_flux.emulator``, only the
standard library, aiohttp (with its yarl) and Pillow.

Modules, each importing only those listed before it:

* ``images``: deterministic placeholder images (Pillow) and their LRU cache;
* ``scenarios``: :class:`Scenario` (scripted timing and faults), :class:`RecordedRequest`
  and ``InputFetch`` (what was fetched for an edit's input image);
* ``jobs``: ``Job``, the job clock (state, queue position, logs and outcome over time);
* ``accounts``: the concurrency limit per account: when each job leaves the queue, and the
  peak of jobs running at once;
* ``validation``: the Kontext family's input and request-header validation fal answers 422 with;
* ``core``: the state the handlers share (with the accounts), the middleware and fal-shaped
  error bodies;
* ``fetch``: loading edit inputs when their job leaves the queue, a mixin on ``core``;
* ``queue_api`` (on ``fetch``), ``outputs``, ``admin``: the handlers (submit/status/stream/
  cancel, result/CDN, ``/_emulator/``), mixins on ``core``;
* ``app``: the aiohttp app (routes; its docstring lists endpoints and simplifications);
* ``server``: :class:`FluxEmulator`, the threaded runner, re-exporting the public names;
* ``__main__``: the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_flux.emulator.server import FluxEmulator, RecordedRequest, Scenario

__all__ = ["FluxEmulator", "RecordedRequest", "Scenario"]


def __getattr__(name: str) -> Any:
    # Lazy export: aiohttp is only imported when the emulator is actually used.
    if name in __all__:
        from airflow_flux.emulator import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
