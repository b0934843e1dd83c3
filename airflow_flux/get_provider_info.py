"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``).

Kept free of imports so Airflow can list the provider without importing it.
"""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-flux",
        "name": "FLUX (fal)",
        # U+2060 (word joiner, zero width) after "[": `airflow providers list` renders the
        # description as Rich markup, which reads "[pro]" as a style tag and drops it. A
        # backslash escape would fix only the table and show up in the UI, JSON and plain output.
        "description": "Generate images with FLUX.1 Kontext [\u2060pro] on fal's queue API and copy them to S3.",
        "versions": ["0.1.0"],
        "integrations": [
            {
                "integration-name": "FLUX (fal)",
                "external-doc-url": "https://fal.ai/models/fal-ai/flux-pro/kontext/text-to-image",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": "FLUX (fal)", "python-modules": ["airflow_flux.hooks.flux"]}],
        "operators": [
            {
                "integration-name": "FLUX (fal)",
                "python-modules": ["airflow_flux.operators.flux", "airflow_flux.operators.batch"],
            }
        ],
        "sensors": [{"integration-name": "FLUX (fal)", "python-modules": ["airflow_flux.sensors.flux"]}],
        "triggers": [
            {
                "integration-name": "FLUX (fal)",
                "python-modules": ["airflow_flux.triggers.flux", "airflow_flux.triggers.batch"],
            }
        ],
        "transfers": [
            {
                "source-integration-name": "FLUX (fal)",
                "target-integration-name": "Amazon Simple Storage Service (S3)",
                "python-module": "airflow_flux.transfers.flux_to_s3",
            }
        ],
        "extra-links": [
            "airflow_flux.links.flux.FluxRequestLink",
            "airflow_flux.links.flux.FluxGalleryLink",
            "airflow_flux.links.flux.FluxCopiedImagesLink",
        ],
        # Airflow options this provider reads: listed by `airflow config list` and in the UI's
        # configuration page, with their defaults (the code falls back to the same values).
        "config": {
            "flux": {
                "description": "FLUX (fal) in the triggerer.",
                "options": {
                    "max_connections": {
                        "description": "HTTP connections to the API that one triggerer's event loop holds at "
                        "once, shared by every flux connection and wait on it; status streams take at most "
                        "three quarters of them, the other waits poll.",
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "400",
                        "default": "100",
                    },
                },
            },
            "flux_gallery": {
                "description": "The Flux gallery plugin in the api-server.",
                "options": {
                    "image_delivery": {
                        "description": "How full images reach the browser: 'stream' (through the api-server) "
                        "or 'presigned' (a redirect to a short-lived presigned S3 URL).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "presigned",
                        "default": "stream",
                    },
                    "presigned_expiry": {
                        "description": "Lifetime of a presigned image URL, seconds.",
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "60",
                        "default": "300",
                    },
                    "aws_conn_id": {
                        "description": "The connection that reads a copy task's manifest and images when "
                        "its rendered aws_conn_id is empty.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "gallery_s3",
                        "default": "aws_default",
                    },
                    "page_size": {
                        "description": "Images per page of a run.",
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "48",
                        "default": "24",
                    },
                },
            },
        },
        "connection-types": [
            {
                "hook-class-name": "airflow_flux.hooks.flux.FluxHook",
                "hook-name": "FLUX (fal queue API)",
                "connection-type": "flux",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"host": "Base URL", "password": "API token"},
                    "placeholders": {
                        "host": "https://queue.fal.run (fal direct) or your aggregator's base URL",
                        "password": "fal key, or the aggregator's bearer token",
                    },
                },
                # The UI shows each field's schema "default" (a new connection starts from it)
                # and saves every field's value into extra, so a default must be what the hook
                # does with the field absent. Choices that depend on the host are an explicit
                # "auto" (resolved by the hook, so it follows a later change of the base URL),
                # never a null choice: the UI labels null "null", and a null switch reads "off".
                "conn-fields": {
                    "auth_scheme": {
                        "label": "Auth scheme",
                        "description": "'Key' for fal's own hosts, 'Bearer' for aggregators. "
                        "Auto: Key on *.fal.run, Bearer elsewhere.",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["auto", "Key", "Bearer"],
                            "default": "auto",
                            "values_display": {
                                "auto": "Auto (Key on fal's hosts, Bearer elsewhere)",
                                "Key": "Key (fal direct)",
                                "Bearer": "Bearer (aggregators)",
                            },
                        },
                    },
                    "endpoint": {
                        "label": "Endpoint",
                        "description": "fal model path.",
                        "schema": {"type": ["string", "null"], "default": "fal-ai/flux-pro/kontext/text-to-image"},
                    },
                    "rebase_urls": {
                        "label": "Re-base returned URLs",
                        "description": "Rewrite the status/result/cancel URLs the API returns onto this "
                        "connection's base URL (aggregators). Auto: on for non-fal hosts, off on fal's; "
                        "off means a returned URL on an untrusted host is refused.",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["auto", "on", "off"],
                            "default": "auto",
                            "values_display": {
                                "auto": "Auto (on for non-fal hosts, off on fal's)",
                                "on": "On",
                                "off": "Off",
                            },
                        },
                    },
                    "trusted_hosts": {
                        "label": "Trusted hosts",
                        "description": "Extra hosts (comma separated) that may receive the token.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "allowed_image_hosts": {
                        "label": "Allowed image hosts",
                        "description": "Hosts (comma separated: host, host:port or *.domain) the copy to S3 "
                        "may download images from, besides this connection's host and fal's media CDN "
                        "(fal.media). Listed hosts may be private or loopback addresses.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "max_image_mib": {
                        "label": "Largest image (MiB)",
                        "description": "An image larger than this fails its copy and nothing of it is stored.",
                        "schema": {"type": ["number", "null"], "default": 256, "exclusiveMinimum": 0},
                    },
                    "timeout": {
                        "label": "Timeout (s)",
                        "description": "Timeout of one HTTP call, in seconds.",
                        "schema": {"type": ["number", "null"], "default": 60},
                    },
                    "store_io": {
                        "label": "Let fal store payloads",
                        "description": "Off: fal keeps no copy of the requests' input and output payloads "
                        "(X-Fal-Store-IO: 0). On is fal's own default.",
                        "schema": {"type": ["boolean", "null"], "default": True},
                    },
                    "media_expires_in": {
                        "label": "CDN file lifetime (s)",
                        "description": "Seconds fal's CDN keeps generated files "
                        "(X-Fal-Object-Lifecycle-Preference). Empty: fal's default.",
                        "schema": {"type": ["integer", "null"], "minimum": 1},
                    },
                    "concurrency": {
                        "label": "Account concurrency",
                        "description": "Requests your fal account runs at once (2 to 40; fal raises it "
                        "with spend). A batch keeps twice this many submitted and unfinished. Empty: 10.",
                        "schema": {"type": ["integer", "null"], "minimum": 1},
                    },
                    "price_per_image": {
                        "label": "Price per image (USD)",
                        "description": "This connection's price, for cost_usd (an aggregator's). "
                        "Empty: each endpoint's published price.",
                        "schema": {"type": ["number", "null"], "minimum": 0},
                    },
                    "price_per_megapixel": {
                        "label": "Price per megapixel (USD)",
                        "description": "This connection's price per megapixel, for endpoints priced per "
                        "megapixel (FLUX.2; an aggregator's). Empty: each endpoint's published price.",
                        "schema": {"type": ["number", "null"], "minimum": 0},
                    },
                },
            }
        ],
    }
