"""Presigned URLs are credentials while they live: their signatures never reach a log or an error.

The operators hand fal presigned GET URLs for ``s3://`` inputs. fal (and the emulator) may
echo an input URL back, in a 422 that says it could not be fetched or in a status's log
lines; the hook's error parsing and the status models pass what they show through
:func:`redact_presigned`, which keeps the URL's host and path (enough to tell which input)
and drops its query. A leaf module: no imports from the package.
"""

from __future__ import annotations

import re

#: Query parameters that make a URL a credential: AWS SigV4 and SigV2, and GCS/Azure-style
#: signatures a caller may pass as an ``https://`` input.
_SIGNED_QUERY = re.compile(
    r"(?P<url>https?://[^\s\"'<>?]+)\?(?P<query>[^\s\"'<>]*?(?:X-Amz-Signature|X-Amz-Credential|"
    r"X-Amz-Security-Token|Signature=|X-Goog-Signature|sig=)[^\s\"'<>]*)",
    re.IGNORECASE,
)
REDACTED = "<signed query redacted>"


def redact_presigned(text: str) -> str:
    """``text`` with the query of every signed URL in it replaced by a marker."""
    if "?" not in text:
        return text
    return _SIGNED_QUERY.sub(lambda m: f"{m.group('url')}?{REDACTED}", text)


def redact_value(value: object) -> object:
    """:func:`redact_presigned` through strings, lists and dicts (an API error body)."""
    if isinstance(value, str):
        return redact_presigned(value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value
