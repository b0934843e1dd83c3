"""A local stand-in for fal's queue API serving FLUX.1 Kontext [pro].

Start it in-process with :class:`FluxEmulator` (tests) or as a process with
``python -m airflow_flux.emulator`` (demos). The server module (aiohttp) and Pillow are
imported only when first used so that importing ``airflow_flux`` stays light.
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
