"""Schemathesis against the live app: no 5xx, every 4xx in the envelope, 2xx matching the schema.

Run through schemathesis' CLI (its stable interface) with a bounded number of examples, a fixed
seed and every check except `positive_data_acceptance`: schema-valid bodies may still be refused,
since sizes, token counts and uploads are checked beyond what JSON Schema can express. Response
bodies of every status are validated against the schema, where every error status is documented
as OpenAI's error envelope.
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx


def cancel_jobs(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        jobs = http.get("/v1/images/jobs?limit=100").json()["data"]
        for job in jobs:
            if job["status"] in ("queued", "in_progress"):
                http.delete(f"/v1/images/jobs/{job['id']}")


def test_schemathesis_finds_no_failures(base_url, tmp_path):
    report = tmp_path / "report.json"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{base_url}/openapi.json",
        "--max-examples=25",
        "--seed=20261125",
        "--phases=examples,coverage,fuzzing",
        "--checks=all",
        "--exclude-checks=positive_data_acceptance",
        "--request-timeout=120",
        # Up to ten images per request, with the fuzzer's own async jobs sharing the model.
        "--max-response-time=60",
        "--generation-database=none",
        "--report=ndjson",
        f"--report-ndjson-path={report}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    finally:
        cancel_jobs(base_url)  # the fuzzer's `Prefer: respond-async` requests queued jobs
    tail = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    events = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    assert events, "schemathesis reported nothing"
    assert "/v1/images/generations" in result.stdout and "/v1/images/edits" in result.stdout, tail
