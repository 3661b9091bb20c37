"""A small Hugging Face Hub served over real HTTP on 127.0.0.1, for push / pull tests without the network.

It speaks the part of the Hub API that `huggingface_hub` (1.x / 2.x) and transformers use to create a model repo,
commit files (`preupload` answers "regular" for every file, so uploads arrive base64-inline in the NDJSON commit and
neither LFS nor Xet is involved), read repo info / trees / paths-info, and download files through
`/{repo}/resolve/{revision}/{path}` (HEAD and GET, with `ETag`, `X-Repo-Commit`, `Content-Length`, and the
`X-Error-Code` headers the client maps to `RepositoryNotFoundError` / `RevisionNotFoundError` /
`EntryNotFoundError`). Repos live in memory; every commit has a 40-hex SHA. Requests that match no route get a
501 and are recorded in `LocalHub.unhandled`, so tests can assert the client used nothing unexpected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
ORGS = ("org",)
MAX_BODY_BYTES = 64 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob, which the Hub reports as a regular file's `oid` / `ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """One snapshot of a repo: every file's content at that commit."""

    sha: str
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    """A model repo: its commits by SHA and its branches (name -> head SHA)."""

    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or full commit SHA points to."""
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class HubError(Exception):
    """An error answer: HTTP status plus the `X-Error-Code` huggingface_hub reads."""

    def __init__(self, status: HTTPStatus, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LocalHub:
    """The in-memory Hub state and the HTTP server that exposes it (start with `start()`, stop with `stop()`)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.unhandled: list[str] = []
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("The local Hub is not running: call `start()` first.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        """Serve on 127.0.0.1 on a free port, from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("The local Hub is already running.")
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------------------------
    # State (all under the lock)
    # ------------------------------------------------------------------------------------------------------------------
    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """A file's content as stored, for assertions in tests."""
        with self._lock:
            return self._commit(repo_id, revision).files[path]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file at a revision."""
        with self._lock:
            return dict(self._commit(repo_id, revision).files)

    def commit_messages(self, repo_id: str) -> list[str]:
        """Messages of every commit of a repo, oldest first."""
        with self._lock:
            return [commit.message for commit in self._repo(repo_id).commits.values()]

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(HTTPStatus.NOT_FOUND, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _commit(self, repo_id: str, revision: str) -> Commit:
        commit = self._repo(repo_id).resolve(unquote(revision))
        if commit is None:
            raise HubError(HTTPStatus.NOT_FOUND, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _new_commit(self, repo: Repo, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        self._counter += 1
        sha = hashlib.sha1(f"{repo.repo_id}\0{self._counter}\0{message}".encode()).hexdigest()
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        commit = Commit(sha=sha, message=message, files=files, date=date)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def create_repo(self, payload: dict[str, Any]) -> tuple[HTTPStatus, dict]:
        if payload.get("type", "model") != "model":
            raise HubError(HTTPStatus.BAD_REQUEST, None, "This local Hub only hosts model repos")
        namespace = payload.get("organization") or USER
        if namespace != USER and namespace not in ORGS:
            raise HubError(HTTPStatus.FORBIDDEN, None, f"You don't have the rights to create a repo in {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        with self._lock:
            if repo_id in self.repos:
                # Like the Hub, a conflict still names the repo's URL (`create_repo(exist_ok=True)` reads it).
                return HTTPStatus.CONFLICT, {
                    "error": "You already created this model repo",
                    "url": self._repo_url(repo_id),
                }
            repo = Repo(repo_id=repo_id, private=payload.get("visibility") == "private")
            self.repos[repo_id] = repo
            self._new_commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES})
        return HTTPStatus.OK, {"url": self._repo_url(repo_id), "name": repo_id, "id": repo_id}

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.url}/{repo_id}"

    def preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> dict:
        with self._lock:
            existing = self._commit(repo_id, revision).files
            return {
                "files": [
                    {
                        "path": entry["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha(existing[entry["path"]]) if entry["path"] in existing else None,
                    }
                    for entry in payload["files"]
                ]
            }

    def commit(self, repo_id: str, revision: str, body: bytes) -> dict:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(HTTPStatus.BAD_REQUEST, None, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self._lock:
            repo = self._repo(repo_id)
            branch = unquote(revision)
            parent = self._commit(repo_id, branch)
            if branch not in repo.branches:
                raise HubError(HTTPStatus.BAD_REQUEST, None, f"Can only commit to a branch, got {branch}")
            if header.get("parentCommit") not in (None, parent.sha):
                raise HubError(HTTPStatus.PRECONDITION_FAILED, None, "A commit has happened since the parent commit")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(HTTPStatus.BAD_REQUEST, None, f"Unsupported encoding {value.get('encoding')}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(HTTPStatus.NOT_FOUND, "EntryNotFound", "A file with this name doesn't exist")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {path: content for path, content in files.items() if not path.startswith(prefix)}
                else:
                    raise HubError(HTTPStatus.BAD_REQUEST, None, f"Unsupported commit operation {key!r} (no LFS here)")
            message = header.get("summary") or "commit"
            commit = self._new_commit(repo, branch, message, files)
        return {
            "commitUrl": f"{self.url}/{repo_id}/commit/{commit.sha}",
            "commitOid": commit.sha,
            "success": True,
            "pullRequestUrl": None,
        }

    def create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> dict:
        with self._lock:
            repo = self._repo(repo_id)
            if branch in repo.branches:
                raise HubError(HTTPStatus.CONFLICT, None, f"Reference refs/heads/{branch} already exists")
            start = self._commit(repo_id, payload.get("startingPoint") or "main")
            repo.branches[branch] = start.sha
        return {}

    def model_info(self, repo_id: str, revision: str) -> dict:
        with self._lock:
            repo = self._repo(repo_id)
            commit = self._commit(repo_id, revision)
            config = commit.files.get("config.json")
            return {
                "id": repo_id,
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": next(iter(repo.commits.values())).date,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["transformers"],
                "library_name": "transformers",
                "config": json.loads(config) if config else {},
                "siblings": [
                    {"rfilename": path, "size": len(content), "blobId": git_blob_sha(content)}
                    for path, content in sorted(commit.files.items())
                ],
            }

    def tree(self, repo_id: str, revision: str, folder: str, recursive: bool) -> list[dict]:
        with self._lock:
            files = self._commit(repo_id, revision).files
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if len(parts) > 1 and not recursive:
                entries.setdefault(prefix + parts[0], {"type": "directory", "oid": "0" * 40, "size": 0})
                continue
            if recursive:
                for depth in range(1, len(parts)):
                    folder_path = prefix + "/".join(parts[:depth])
                    entries.setdefault(folder_path, {"type": "directory", "oid": "0" * 40, "size": 0})
            entries[path] = {"type": "file", "oid": git_blob_sha(content), "size": len(content)}
        if prefix and not entries:
            raise HubError(HTTPStatus.NOT_FOUND, "EntryNotFound", f"{folder} does not exist on {revision}")
        return [{"path": path, **entry} for path, entry in entries.items()]

    def paths_info(self, repo_id: str, revision: str, paths: list[str]) -> list[dict]:
        with self._lock:
            files = self._commit(repo_id, revision).files
        infos = []
        for path in paths:
            if path in files:
                infos.append({"type": "file", "path": path, "oid": git_blob_sha(files[path]), "size": len(files[path])})
            elif any(name.startswith(path.rstrip("/") + "/") for name in files):
                infos.append({"type": "directory", "path": path.rstrip("/"), "oid": "0" * 40, "size": 0})
        return infos

    def resolve_file(self, repo_id: str, revision: str, path: str) -> tuple[Commit, bytes]:
        with self._lock:
            commit = self._commit(repo_id, revision)
            if path not in commit.files:
                raise HubError(HTTPStatus.NOT_FOUND, "EntryNotFound", f"Entry not found: {path}")
            return commit, commit.files[path]


class _HubHandler(BaseHTTPRequestHandler):
    """Routes one request to `LocalHub`; JSON in, JSON out, HTTP/1.1 keep-alive with explicit lengths."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"

    _API_ROUTES = (
        ("GET", re.compile(r"/api/whoami-v2"), "_whoami"),
        ("GET", re.compile(r"/api/agent-harnesses"), "_agent_harnesses"),
        ("POST", re.compile(r"/api/repos/create"), "_create_repo"),
        ("POST", re.compile(r"/api/validate-yaml"), "_validate_yaml"),
        ("POST", re.compile(rf"/api/models/{_REPO}/preupload/{_REV}"), "_preupload"),
        ("POST", re.compile(rf"/api/models/{_REPO}/commit/{_REV}"), "_commit"),
        ("POST", re.compile(rf"/api/models/{_REPO}/branch/{_REV}"), "_create_branch"),
        ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/{_REV})?"), "_model_info"),
        ("GET", re.compile(rf"/api/models/{_REPO}/tree/{_REV}(?P<path>/.*)?"), "_tree"),
        ("POST", re.compile(rf"/api/models/{_REPO}/paths-info/{_REV}"), "_paths_info"),
        ("GET", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), "_resolve"),
        ("HEAD", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), "_resolve"),
    )

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr line (requests are recorded in `hub.requests`)."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        try:
            self.body = self._read_body()
        except HubError as error:
            self.close_connection = True
            self._send_json(error.status, {"error": error.message})
            return
        self.hub.requests.append(f"{method} {split.path}")
        for route_method, pattern, name in self._API_ROUTES:
            match = pattern.fullmatch(split.path)
            if route_method == method and match:
                try:
                    getattr(self, name)(method, **match.groupdict())
                except HubError as error:
                    self._send_json(error.status, {"error": error.message}, error_code=error.code)
                return
        self.hub.unhandled.append(f"{method} {self.path}")
        self._send_json(HTTPStatus.NOT_IMPLEMENTED, {"error": f"The local Hub does not serve {method} {split.path}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HubError(HTTPStatus.LENGTH_REQUIRED, None, "The local Hub needs a Content-Length (no chunked bodies)")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, None, f"Request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict[str, Any]:
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return {
                key: values if len(values) > 1 else values[0] for key, values in parse_qs(self.body.decode()).items()
            }
        return json.loads(self.body or b"{}")

    def _send(self, status: HTTPStatus, body: bytes, headers: dict[str, str], head_only: bool = False) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, payload: Any, error_code: str | None = None, head_only: bool = False):
        headers = {"Content-Type": "application/json"}
        if error_code is not None:
            headers["X-Error-Code"] = error_code
        if status >= 400:
            headers["X-Error-Message"] = payload.get("error", "") if isinstance(payload, dict) else ""
        self._send(status, json.dumps(payload).encode(), headers, head_only=head_only)

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(HTTPStatus.UNAUTHORIZED, None, "Invalid credentials in Authorization header")

    # ------------------------------------------------------------------------------------------------------------------
    # Routes
    # ------------------------------------------------------------------------------------------------------------------
    def _whoami(self, method: str) -> None:
        self._require_token()
        self._send_json(
            HTTPStatus.OK,
            {
                "type": "user",
                "name": USER,
                "fullname": "Local Hub tester",
                "orgs": [{"type": "org", "name": org, "roleInOrg": "admin"} for org in ORGS],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            },
        )

    def _agent_harnesses(self, method: str) -> None:
        """The registry huggingface_hub reads to tag its user agent; empty here."""
        self._send_json(HTTPStatus.OK, {"standardEnvVars": [], "harnesses": {}})

    def _create_repo(self, method: str) -> None:
        self._require_token()
        status, payload = self.hub.create_repo(self._json_body())
        self._send_json(status, payload)

    def _validate_yaml(self, method: str) -> None:
        self._send_json(HTTPStatus.OK, {"errors": [], "warnings": []})

    def _preupload(self, method: str, repo: str, rev: str) -> None:
        self._require_token()
        self._send_json(HTTPStatus.OK, self.hub.preupload(repo, rev, self._json_body()))

    def _commit(self, method: str, repo: str, rev: str) -> None:
        self._require_token()
        if "create_pr" in self.query:
            raise HubError(HTTPStatus.BAD_REQUEST, None, "The local Hub does not do pull requests")
        self._send_json(HTTPStatus.OK, self.hub.commit(repo, rev, self.body))

    def _create_branch(self, method: str, repo: str, rev: str) -> None:
        self._require_token()
        self._send_json(HTTPStatus.OK, self.hub.create_branch(repo, unquote(rev), self._json_body()))

    def _model_info(self, method: str, repo: str, rev: str | None) -> None:
        self._send_json(HTTPStatus.OK, self.hub.model_info(repo, rev or "main"))

    def _tree(self, method: str, repo: str, rev: str, path: str | None) -> None:
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._send_json(HTTPStatus.OK, self.hub.tree(repo, rev, unquote(path or ""), recursive))

    def _paths_info(self, method: str, repo: str, rev: str) -> None:
        paths = self._json_body().get("paths", [])
        self._send_json(HTTPStatus.OK, self.hub.paths_info(repo, rev, [paths] if isinstance(paths, str) else paths))

    def _resolve(self, method: str, repo: str, rev: str, path: str) -> None:
        head_only = method == "HEAD"
        try:
            commit, content = self.hub.resolve_file(repo, rev, unquote(path))
        except HubError as error:
            self._send_json(error.status, {"error": error.message}, error_code=error.code, head_only=head_only)
            return
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha(content)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
        }
        self._send(HTTPStatus.OK, content, headers, head_only=head_only)
