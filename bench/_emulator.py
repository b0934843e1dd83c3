"""Runs the fal queue emulator in its own process for the benchmarks.

Same command line as ``python -m airflow_flux.emulator``, plus:

* the open-file limit is raised to the hard limit first (thousands of open SSE streams);
* unless ``--real-images`` is given, result and CDN images are one small constant JPEG.
  The emulator renders a 1 MP Pillow image the first time a result is fetched (~17 ms of
  CPU each here); fal's result endpoint only returns JSON, so at 5,000 completions within a
  few seconds the render queue, not the client under test, would decide how late events are.
"""

from __future__ import annotations

import resource
import sys
from functools import cache


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@cache
def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 80, 40)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _cheap_render(*args: object, **kwargs: object) -> bytes:
    return _tiny_jpeg()


def main(argv: list[str]) -> int:
    raise_nofile()
    if "--real-images" in argv:
        argv = [a for a in argv if a != "--real-images"]
    else:
        from airflow_flux.emulator import images

        _tiny_jpeg()  # import Pillow before the clock starts
        images.render_image = _cheap_render  # emulator.outputs looks it up at call time
    from airflow_flux.emulator.__main__ import main as emulator_main

    return emulator_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
