"""A small Kubeflow Pipelines API server on loopback: the v2beta1 endpoints `segflow submit` and
`segflow schedule` use, nothing else.

Each request body is checked against kfp_server_api's models (field names, nesting, types and
required fields), so a malformed request fails the test instead of passing silently; every
accepted request is kept in ``requests`` for the test to inspect.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import kfp_server_api

_PRIMITIVES = {"str": str, "bool": bool, "int": int, "float": (int, float), "object": object, "datetime": str}


def check(value, kind: str, where: str = "body") -> None:
    """Raise ValueError where ``value`` does not fit the kfp_server_api type ``kind``."""
    if kind.startswith("list["):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list")
        for i, item in enumerate(value):
            check(item, kind[5:-1], f"{where}[{i}]")
        return
    if kind.startswith("dict("):
        inner = kind[kind.index(",") + 1 : -1].strip()
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object")
        for key, item in value.items():
            check(item, inner, f"{where}.{key}")
        return
    if kind in _PRIMITIVES:
        if kind == "str" and isinstance(value, int) and not isinstance(value, bool):
            return  # int64 fields travel as JSON strings or numbers
        if not isinstance(value, _PRIMITIVES[kind]):
            raise ValueError(f"{where}: expected {kind}, got {type(value).__name__}")
        return
    model = getattr(kfp_server_api.models, kind)
    if not getattr(model, "openapi_types", None):  # an enum: a string of its allowed values
        allowed = {v for k, v in vars(model).items() if k.isupper() and isinstance(v, str)}
        if value not in allowed:
            raise ValueError(f"{where}: {value!r} is not one of {sorted(allowed)}")
        return
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a {kind} object")
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    unknown = set(value) - set(fields)
    if unknown:
        raise ValueError(f"{where}: {kind} has no field(s) {sorted(unknown)}")
    for json_name, item in value.items():
        if item is not None:
            check(item, model.openapi_types[fields[json_name]], f"{where}.{json_name}")
    # Building the model runs its own validation (required fields, enums).
    kfp_server_api.ApiClient()._ApiClient__deserialize(value, kind)


class FakeKfp:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        self.experiments: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKfp:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self, model: str) -> dict | None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                    check(body, model)
                except ValueError as exc:
                    self._send(400, {"error": f"malformed {model}: {exc}", "code": 3})
                    return None
                fake.requests.append((self.command, urlparse(self.path).path, body))
                return body

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                fake.requests.append(("GET", url.path, query))
                if url.path == "/apis/v2beta1/healthz":
                    self._send(200, {"multi_user": False})
                elif url.path == "/apis/v2beta1/experiments":
                    found = list(fake.experiments.values())
                    wanted = re.search(r'"string_value":\s*"([^"]*)"', query.get("filter", [""])[0])
                    if wanted:
                        found = [e for e in found if e["display_name"] == wanted.group(1)]
                    self._send(200, {"experiments": found, "total_size": len(found)})
                elif url.path == "/apis/v2beta1/recurringruns":
                    jobs = list(fake.recurring.values())
                    self._send(200, {"recurringRuns": jobs, "total_size": len(jobs)})
                elif url.path.startswith("/apis/v2beta1/runs/"):
                    run = fake.runs.get(url.path.rsplit("/", 1)[-1])
                    self._send(200, run) if run else self._send(404, {"error": "no such run", "code": 5})
                else:
                    self._send(404, {"error": f"not implemented here: GET {url.path}", "code": 12})

            def do_POST(self) -> None:
                path = urlparse(self.path).path
                if path == "/apis/v2beta1/experiments":
                    body = self._body("V2beta1Experiment")
                    if body is not None:
                        experiment = {**body, "experiment_id": uuid.uuid4().hex, "created_at": "2026-12-01T00:00:00Z"}
                        fake.experiments[experiment["experiment_id"]] = experiment
                        self._send(200, experiment)
                elif path == "/apis/v2beta1/runs":
                    body = self._body("V2beta1Run")
                    if body is not None:
                        run = {**body, "run_id": uuid.uuid4().hex, "state": "PENDING"}
                        fake.runs[run["run_id"]] = run
                        self._send(200, run)
                elif path == "/apis/v2beta1/recurringruns":
                    body = self._body("V2beta1RecurringRun")
                    if body is not None:
                        job = {**body, "recurring_run_id": uuid.uuid4().hex, "status": "ENABLED"}
                        fake.recurring[job["recurring_run_id"]] = job
                        self._send(200, job)
                else:
                    self._send(404, {"error": f"not implemented here: POST {path}", "code": 12})

            def do_DELETE(self) -> None:
                path = urlparse(self.path).path
                fake.requests.append(("DELETE", path, {}))
                job_id = path.rsplit("/", 1)[-1]
                if path.startswith("/apis/v2beta1/recurringruns/") and job_id in fake.recurring:
                    del fake.recurring[job_id]
                    self._send(200, {})
                else:
                    self._send(404, {"error": f"no recurring run {job_id}", "code": 5})

        return Handler
