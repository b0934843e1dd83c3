"""XCom keys shared by the tasks that push them and the links and gallery that read them.

A leaf module: the operators, the transfer, the extra links and the gallery plugin all
import these names from here, so none of them needs another's module.
"""

from __future__ import annotations

#: The request's ``response_url``, pushed by the submit (and the sensor) as soon as the
#: request is known: the "FLUX request" link opens it, the gallery link takes its request id.
LINK_XCOM_KEY = "flux_request_url"
#: The ``s3://`` URI of a copy's manifest: the Flux gallery finds a run's images through it.
MANIFEST_XCOM_KEY = "flux_manifest"
