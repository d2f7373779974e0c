"""A tiny fake Hugging Face Hub (http.server in a thread) for upload tests: no network needed.

It implements just what ``huggingface_hub`` sends for ``create_repo``, ``create_branch`` and
``upload_folder``: repo creation, branch creation, the pre-upload check (every file "regular",
so no LFS/xet transfer) and the NDJSON commit, whose files it stores in memory.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT_OID = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Records requests and committed files; ``url`` is what HF_ENDPOINT should point at."""

    def __init__(self, token: str = "hf_test_token") -> None:
        self.token = token
        self.requests: list[tuple[str, str]] = []
        self.repos: dict[str, dict[str, Any]] = {}
        self.branches: dict[str, set[str]] = {}
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, revision) -> path -> content
        self.commit_messages: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _reply(self, status: int, body: Any = None) -> None:
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                hub.requests.append(("POST", self.path))
                body = self._body()
                if not self._authorized():
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "validate-yaml"]:  # the model card's metadata block
                    self._reply(200, {"errors": [], "warnings": []})
                elif parts[:3] == ["api", "repos", "create"]:
                    payload = json.loads(body)
                    repo = (
                        f"{payload.get('organization') or 'user'}/{payload['name']}"
                        if "/" not in payload["name"]
                        else payload["name"]
                    )
                    hub.repos[repo] = payload
                    hub.branches.setdefault(repo, {"main"})
                    self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
                elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "branch":
                    repo = "/".join(parts[2:4])
                    hub.branches.setdefault(repo, {"main"}).add("/".join(parts[5:]))
                    self._reply(200, {})
                elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    self._reply(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
                    repo, revision = "/".join(parts[2:4]), "/".join(parts[5:])
                    store = hub.files.setdefault((repo, revision), {})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.commit_messages.append(item["value"].get("summary", ""))
                        elif item["key"] == "file":
                            store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    self._reply(
                        200,
                        {
                            "commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{COMMIT_OID}",
                            "commitOid": COMMIT_OID,
                        },
                    )
                else:
                    self._reply(404, {"error": f"fake hub: no route for POST {self.path}"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
