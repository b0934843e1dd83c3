"""What boto3's upload_fileobj holds in memory for a large file: its default against one part at a time.

Why the batch's results file (and its requests file) are moved one S3 part at a time: each
mode runs in a child process of its own (its peak RSS is that mode's), uploading the same
file (150,000 JSON lines, 49 MB, like a 100,000-prompt batch's results) from disk to a moto
server, with the SHA-256 checksum the results file is written with.

Run: ``python bench/upload_memory.py``
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, moto_server

LINES = 150_000


def child(url: str, mode: str) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    with tempfile.TemporaryFile() as f:
        line = json.dumps({"index": 1, "status": "completed", "prompt": "x" * 300}).encode() + b"\n"
        for _ in range(LINES):
            f.write(line)
        size = f.tell()
        f.seek(0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        config = {} if mode == "default" else {"Config": TransferConfig(use_threads=False)}
        client.upload_fileobj(f, "bench-upload", mode, ExtraArgs={"ChecksumAlgorithm": "SHA256"}, **config)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "file_mb": round(size / 1e6, 1), "peak_growth_mb": round(after - before, 1)}))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return 0
    print(f"Command: {command_line()}\n")
    print("| upload_fileobj | file | peak RSS growth |\n|---|---|---|")
    with moto_server() as url:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench-upload")
        for mode in ("default", "one_part_at_a_time"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", url, mode], check=True, capture_output=True, text=True
            ).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            print(f"| {mode} | {figures['file_mb']} MB | {figures['peak_growth_mb']} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
