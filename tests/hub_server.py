"""A Hub-compatible HTTP server on loopback, for tests that push and load through a real `huggingface_hub` client.

It implements exactly the endpoints that huggingface_hub 2.x and transformers 5.x call to create a model repo,
commit files to it and download them again (`create_repo`, `model_info`/`repo_info`, `preupload`, `create_commit`,
`list_repo_tree`/`list_repo_files`, `whoami`, README metadata validation, and HEAD/GET on `/resolve/`), with the
headers and error codes the client relies on (`X-Repo-Commit`, `ETag`, `X-Error-Code: RepoNotFound` /
`RevisionNotFound` / `EntryNotFound`).

Every file is answered "regular" by the preupload endpoint, so the client sends the content inline (base64) in the
commit payload and never negotiates LFS or Xet storage: the client only opens an Xet upload for files the Hub
classifies as "lfs" (see `huggingface_hub._commit_api._fetch_upload_modes`), and it only downloads through Xet when a
response carries `X-Xet-Hash`, which this server never sends.

Repos live in a temporary directory: blobs are stored on disk under their git blob id, and every commit keeps the full
path -> blob mapping of its tree, so any past commit id is a valid revision. Any bearer token is accepted; writes
require one, as on the Hub. Only 127.0.0.1 is ever bound.

Usage::

    with running_hub_server() as url:
        env = {"HF_ENDPOINT": url, "HF_TOKEN": "dummy", "HF_HUB_OFFLINE": "0"}
        ...  # run the client in a subprocess with that environment

or ``python tests/hub_server.py`` to serve in the foreground.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

USER_NAME = "gcmr-tester"
DEFAULT_BRANCH = "main"
MAX_BODY_BYTES = 512 * 1024 * 1024  # one commit payload; far above any test checkpoint
MAX_COMMIT_LINES = 100_000
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
_API_ACTIONS = ("revision", "tree", "preupload", "commit")


def git_blob_id(content: bytes) -> str:
    """The id git (and the Hub) gives a blob: sha1 over a `blob <size>\\0` header and the content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An error answer: HTTP status, the Hub's `X-Error-Code` (or None), a message, extra headers and body fields."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.headers = headers or {}
        self.body = body or {}


@dataclass
class _Commit:
    oid: str
    parent: str | None
    summary: str
    tree: dict[str, tuple[str, int]]  # path -> (blob id, size)
    date: str


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, _Commit] = field(default_factory=dict)


class HubState:
    """Repos, commits and blobs of the server; every method is safe to call from several handler threads."""

    def __init__(self, root: str):
        self.root = root
        self.blob_dir = os.path.join(root, "blobs")
        os.makedirs(self.blob_dir, exist_ok=True)
        self.repos: dict[str, _Repo] = {}
        self.lock = threading.Lock()

    # -- blobs --------------------------------------------------------------------------------------------------
    def _store_blob(self, content: bytes) -> str:
        oid = git_blob_id(content)
        path = os.path.join(self.blob_dir, oid)
        if not os.path.exists(path):
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(content)
            os.replace(tmp, path)
        return oid

    def blob_path(self, oid: str) -> str:
        return os.path.join(self.blob_dir, oid)

    # -- repos and revisions ------------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool, url: str) -> None:
        with self.lock:
            if repo_id in self.repos:
                # The Hub's 409 carries the repo URL: `create_repo(exist_ok=True)` returns it.
                raise HubError(409, "You already created this model repo", body={"url": url})
            now = _now()
            repo = _Repo(repo_id=repo_id, private=private, created_at=now)
            # The Hub creates every repo with an initial commit holding .gitattributes, so `main` always resolves.
            tree = {".gitattributes": (self._store_blob(_GITATTRIBUTES), len(_GITATTRIBUTES))}
            self._add_commit(repo, DEFAULT_BRANCH, None, "initial commit", tree)
            self.repos[repo_id] = repo

    def get_repo(self, repo_id: str) -> _Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def resolve(self, repo_id: str, revision: str) -> _Commit:
        """The commit a branch name or a (full) commit id points to."""
        with self.lock:
            repo = self.get_repo(repo_id)
            oid = repo.branches.get(revision)
            if oid is None and _COMMIT_ID.match(revision) and revision in repo.commits:
                oid = revision
            if oid is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return repo.commits[oid]

    def _add_commit(self, repo: _Repo, branch: str, parent: str | None, summary: str, tree: dict) -> _Commit:
        date = _now()
        payload = json.dumps([parent, summary, sorted(tree.items()), date, len(repo.commits)]).encode()
        commit = _Commit(hashlib.sha1(payload).hexdigest(), parent, summary, tree, date)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def commit(
        self, repo_id: str, branch: str, header: dict, files: dict[str, bytes], deletions: list[tuple[str, bool]]
    ) -> _Commit:
        """Apply one commit on `branch`: file/folder deletions, then the new file contents."""
        with self.lock:
            repo = self.get_repo(repo_id)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            head = repo.branches[branch]
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and not head.startswith(parent_commit):
                raise HubError(412, f"A commit happened since {parent_commit}: the head of {branch} is {head}")
            tree = dict(repo.commits[head].tree)
            for path, is_folder in deletions:
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)] if is_folder else [path] if path in tree else []
                if not doomed:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            for path, content in files.items():
                tree[path] = (self._store_blob(content), len(content))
            return self._add_commit(repo, branch, head, header.get("summary") or "", tree)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _header_value(text: str) -> str:
    """HTTP header values are one latin-1 line: escape everything else."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\r", " ").replace("\n", " ")


def _validate_path_in_repo(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or ".git" in parts:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _parse_repo_and_rest(segments: list[str], actions: tuple[str, ...]) -> tuple[str, str | None, list[str]]:
    """Split `[namespace/]name[/action/...]` into (repo_id, action, rest); repo names never equal an action word."""
    for n_repo in (2, 1):
        if len(segments) > n_repo and segments[n_repo] in actions:
            return "/".join(segments[:n_repo]), segments[n_repo], segments[n_repo + 1 :]
    if 1 <= len(segments) <= 2:
        return "/".join(segments), None, []
    raise HubError(404, "Unknown route: /" + "/".join(segments))


def _check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(_REPO_NAME.match(p) for p in parts):
        raise HubError(400, f"Invalid repo id: {repo_id!r} (expected 'namespace/name')")
    return repo_id


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes the Hub API subset; `self.server.state` holds the repos and `self.server.url` the base URL."""

    server_version = "gcmr-test-hub/1.0"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # the test output stays readable
        pass

    # -- plumbing -----------------------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    def _read_body(self) -> bytes:
        """Read the whole request body, so that a keep-alive connection stays in sync even when we answer an error."""
        length = self.headers.get("Content-Length")
        if length is not None:
            if int(length) > MAX_BODY_BYTES:
                self.close_connection = True
                raise HubError(413, f"Payload too large: {length} bytes > {MAX_BODY_BYTES}")
            return self.rfile.read(int(length))
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return b""
        body = bytearray()
        while len(body) <= MAX_BODY_BYTES:  # bounded: every pass adds a chunk or returns at the terminator
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline()
        self.close_connection = True
        raise HubError(413, f"Payload too large: more than {MAX_BODY_BYTES} bytes")

    def _json_body(self) -> dict:
        try:
            data = json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Request body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise HubError(400, "Request body must be a JSON object")
        return data

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _require_token(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer ") :].strip():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        segments = [unquote(s) for s in url.path.strip("/").split("/")] if url.path.strip("/") else []
        try:
            self.body = self._read_body()
            self._route(segments, query)
        except HubError as e:
            self._send_error(e)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # malformed payloads are the client's fault
            self._send_error(HubError(400, f"Bad request: {e!r}"))
        except Exception as e:  # answer instead of dropping the connection, so the client shows the cause
            self.close_connection = True
            self._send_error(HubError(500, f"Server error: {e!r}"))

    def _send_error(self, error: HubError) -> None:
        headers = {**error.headers, "X-Error-Message": _header_value(str(error))}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        self._send_json(error.status, {**error.body, "error": str(error)}, headers)

    do_GET = do_HEAD = do_POST = _dispatch

    # -- routing ------------------------------------------------------------------------------------------------
    def _route(self, segments: list[str], query: dict) -> None:
        method = self.command
        if segments[:1] == ["api"]:
            rest = segments[1:]
            if method == "GET" and rest == ["whoami-v2"]:
                return self._whoami()
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo()
            if method == "POST" and rest == ["validate-yaml"]:
                return self._validate_yaml()
            if rest[:1] == ["models"] and len(rest) > 1:
                repo_id, action, tail = _parse_repo_and_rest(rest[1:], _API_ACTIONS)
                return self._model_api(method, repo_id, action, tail, query)
            if rest[:1] in (["datasets"], ["spaces"], ["kernels"]):
                raise HubError(404, f"This test Hub serves model repos only, not {rest[0]}", "RepoNotFound")
            raise HubError(404, f"Unknown API route: {self.path}")
        if method in ("GET", "HEAD"):
            repo_id, action, tail = _parse_repo_and_rest(segments, ("resolve",))
            if action == "resolve" and len(tail) >= 2:
                return self._resolve(repo_id, tail[0], "/".join(tail[1:]))
        raise HubError(404, f"Unknown route: {method} {self.path}")

    def _model_api(self, method: str, repo_id: str, action: str | None, tail: list[str], query: dict) -> None:
        if method == "GET" and action is None:
            return self._model_info(repo_id, DEFAULT_BRANCH, query)
        if method == "GET" and action == "revision" and len(tail) == 1:
            return self._model_info(repo_id, tail[0], query)
        if method == "GET" and action == "tree" and tail:
            return self._tree(repo_id, tail[0], "/".join(tail[1:]), query)
        if method == "POST" and action == "preupload" and len(tail) == 1:
            return self._preupload(repo_id, tail[0], query)
        if method == "POST" and action == "commit" and len(tail) == 1:
            return self._commit(repo_id, tail[0], query)
        raise HubError(404, f"Unknown model API route: {method} {self.path}")

    # -- endpoints ----------------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        self._require_token()
        token = {"displayName": "test", "role": "write"}
        self._send_json(200, {"type": "user", "name": USER_NAME, "fullname": USER_NAME, "orgs": [],
                              "auth": {"type": "access_token", "accessToken": token}})

    def _create_repo(self) -> None:
        self._require_token()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"This test Hub serves model repos only, got type {repo_type!r}")
        name = payload.get("name")
        if not isinstance(name, str):
            raise HubError(400, "create_repo payload needs a string 'name'")
        repo_id = _check_repo_id(f"{payload.get('organization') or USER_NAME}/{name}")
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
        url = f"{self.server.url}/{repo_id}"  # type: ignore[attr-defined]
        self.state.create_repo(repo_id, private, url)
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        """Check the README front matter is a closed `---` block; the real Hub also checks its schema."""
        content = self._json_body().get("content", "")
        if not isinstance(content, str):
            raise HubError(400, "validate-yaml payload needs a string 'content'")
        lines = content.splitlines()
        if not lines or lines[0].strip() != "---":
            warning = {"message": "Empty or missing yaml metadata in repo card"}
            return self._send_json(200, {"errors": [], "warnings": [warning]})
        if "---" not in (line.strip() for line in lines[1:]):
            raise HubError(400, "Invalid metadata in README.md: the YAML front matter opened by '---' is not closed")
        self._send_json(200, {"errors": [], "warnings": []})

    def _model_info(self, repo_id: str, revision: str, query: dict) -> None:
        commit = self.state.resolve(repo_id, revision)
        repo = self.state.get_repo(repo_id)
        with_blobs = query.get("blobs", "").lower() == "true"
        siblings = []
        for path, (oid, size) in sorted(commit.tree.items()):
            sibling: dict = {"rfilename": path}
            if with_blobs:
                sibling.update(size=size, blobId=oid)
            siblings.append(sibling)
        self._send_json(200, {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": commit.oid, "lastModified": commit.date,
            "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": None, "siblings": siblings,
        })

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict) -> None:
        commit = self.state.resolve(repo_id, revision)
        recursive = query.get("recursive", "").lower() == "true"
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}

        def add_folder(sub: str) -> None:  # the Hub lists folders too, with a tree oid
            oid = hashlib.sha1(sub.encode()).hexdigest()
            entries.setdefault(sub, {"type": "directory", "oid": oid, "size": 0, "path": sub})

        for path, (oid, size) in commit.tree.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if recursive:
                for i in range(1, len(parts)):
                    add_folder(prefix + "/".join(parts[:i]))
            elif len(parts) > 1:
                add_folder(prefix + parts[0])
                continue
            entries[path] = {"type": "file", "oid": oid, "size": size, "path": path}
        if prefix and not entries:
            raise HubError(404, f"{folder} does not exist on {revision!r}", "EntryNotFound",
                           {"X-Repo-Commit": commit.oid})
        self._send_json(200, [entries[p] for p in sorted(entries)])

    def _preupload(self, repo_id: str, revision: str, query: dict) -> None:
        self._require_token()
        if query.get("create_pr"):
            raise HubError(400, "This test Hub does not support pull requests (create_pr)")
        commit = self.state.resolve(repo_id, revision)
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload payload needs a 'files' list")
        answer = []
        for item in files:
            path = _validate_path_in_repo(item["path"])
            existing = commit.tree.get(path)
            # "regular" for every file: contents travel inline in the commit, so no LFS or Xet upload is negotiated.
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                           "oid": existing[0] if existing else None})
        self._send_json(200, {"files": answer, "commitOid": commit.oid})

    def _commit(self, repo_id: str, revision: str, query: dict) -> None:
        self._require_token()
        if query.get("create_pr"):
            raise HubError(400, "This test Hub does not support pull requests (create_pr)")
        self.state.get_repo(repo_id)
        lines = self.body.decode("utf-8").splitlines()
        if len(lines) > MAX_COMMIT_LINES:
            raise HubError(413, f"Too many operations in one commit: {len(lines)} > {MAX_COMMIT_LINES}")
        header: dict | None = None
        files: dict[str, bytes] = {}
        deletions: list[tuple[str, bool]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value")
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"commit line {number}: only base64-encoded files are supported")
                files[_validate_path_in_repo(value["path"])] = base64.b64decode(value["content"], validate=True)
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((_validate_path_in_repo(value["path"].rstrip("/")), key == "deletedFolder"))
            elif key == "lfsFile":
                raise HubError(400, f"commit line {number}: LFS files are not accepted (preupload answers 'regular')")
            else:
                raise HubError(400, f"commit line {number}: unknown key {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "commit payload needs a header line with a non-empty 'summary'")
        commit = self.state.commit(repo_id, revision, header, files, deletions)
        url = f"{self.server.url}/{repo_id}/commit/{commit.oid}"  # type: ignore[attr-defined]
        self._send_json(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None, "commitUrl": url})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        commit = self.state.resolve(repo_id, revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        oid, size = entry
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}"}
        start, end, status = 0, size, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            if start >= size and size > 0:
                raise HubError(416, f"Range {self.headers['Range']} not satisfiable for {size} bytes",
                               headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if self.command == "HEAD":
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return
        with open(self.state.blob_path(oid), "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        self._send(status, body, headers, content_type="application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False


def start_hub_server(root: str | None = None) -> tuple[str, Callable[[], None]]:
    """Start the server on 127.0.0.1 (a free port) in a background thread; return its URL and a `stop()`.

    Repos are stored under `root` (a new temporary directory by default, removed by `stop()`).
    """
    own_root = root is None
    root = tempfile.mkdtemp(prefix="gcmr-test-hub-") if root is None else root
    server = _Server(("127.0.0.1", 0), HubRequestHandler)
    server.state = HubState(root)  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                              name="gcmr-test-hub")
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)

    return server.url, stop  # type: ignore[attr-defined]


@contextlib.contextmanager
def running_hub_server(root: str | None = None) -> Iterator[str]:
    """`start_hub_server` as a context manager: yields the URL, stops the server on exit."""
    url, stop = start_hub_server(root)
    try:
        yield url
    finally:
        stop()


def client_env(url: str, hf_home: str) -> dict[str, str]:
    """Environment for a subprocess whose huggingface_hub/transformers talk to the server at `url`.

    huggingface_hub reads these at import time, which is why clients run in their own processes.
    """
    return {
        "HF_ENDPOINT": url,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_TOKEN": "dummy-test-token",
        "HF_HOME": hf_home,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


if __name__ == "__main__":
    base_url, stop_server = start_hub_server()
    print(f"Serving a test Hub at {base_url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        stop_server()
