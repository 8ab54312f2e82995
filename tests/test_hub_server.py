"""The loopback Hub server, driven by the real huggingface_hub client in a subprocess (and by raw HTTP here).

The client runs in its own process because huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import time, and
this test process is offline by design (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from hub_server import client_env, git_blob_id, running_hub_server

CLIENT_SCRIPT = r"""
import json, os, pathlib, sys
from huggingface_hub import HfApi, hf_hub_download, snapshot_download, constants
from huggingface_hub.errors import RepositoryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError

work = pathlib.Path(sys.argv[1])
api = HfApi()
out = {"endpoint": constants.ENDPOINT, "offline": constants.HF_HUB_OFFLINE}
out["whoami"] = api.whoami()["name"]

url = api.create_repo("tester/demo")
out["repo_url"] = str(url)
out["create_again_exist_ok"] = str(api.create_repo("tester/demo", exist_ok=True))
try:
    api.create_repo("tester/demo")
    out["create_again"] = "no error"
except Exception as e:
    out["create_again"] = type(e).__name__ + ":" + str(getattr(e.response, "status_code", ""))

first = api.upload_file(path_or_fileobj=b"hello v1\n", path_in_repo="notes/hello.txt", repo_id="tester/demo")
out["first_commit"] = first.oid

folder = work / "folder"
(folder / "sub").mkdir(parents=True)
binary = bytes(range(256)) * 64
(folder / "model.safetensors").write_bytes(binary)
(folder / "config.json").write_text(json.dumps({"a": 1}))
(folder / "sub" / "deep.txt").write_text("deep")
second = api.upload_folder(folder_path=folder, repo_id="tester/demo", commit_message="add folder")
out["second_commit"] = second.oid
third = api.upload_file(path_or_fileobj=b"hello v2\n", path_in_repo="notes/hello.txt", repo_id="tester/demo")
out["third_commit"] = third.oid
noop = api.upload_file(path_or_fileobj=b"hello v2\n", path_in_repo="notes/hello.txt", repo_id="tester/demo")
out["noop_commit"] = noop.oid

info = api.model_info("tester/demo", files_metadata=True)
out["sha"] = info.sha
out["siblings"] = {s.rfilename: [s.size, s.blob_id] for s in info.siblings}
out["files"] = sorted(api.list_repo_files("tester/demo"))
out["top_level"] = sorted((e.path, type(e).__name__) for e in api.list_repo_tree("tester/demo"))
out["sub_listing"] = sorted(e.path for e in api.list_repo_tree("tester/demo", path_in_repo="sub"))

path = hf_hub_download("tester/demo", "model.safetensors")
out["binary_ok"] = pathlib.Path(path).read_bytes() == binary
out["hello_main"] = pathlib.Path(hf_hub_download("tester/demo", "notes/hello.txt")).read_text()
out["hello_first"] = pathlib.Path(hf_hub_download("tester/demo", "notes/hello.txt", revision=first.oid)).read_text()
snap = pathlib.Path(snapshot_download("tester/demo"))
out["snapshot_files"] = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
out["snapshot_deep"] = (snap / "sub" / "deep.txt").read_text()

def error_of(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__
    return "no error"

out["missing_file"] = error_of(lambda: hf_hub_download("tester/demo", "nope.json"))
out["missing_repo"] = error_of(lambda: hf_hub_download("tester/absent", "config.json"))
out["missing_revision"] = error_of(lambda: hf_hub_download("tester/demo", "config.json", revision="no-such-branch"))
out["missing_repo_info"] = error_of(lambda: api.model_info("tester/absent"))
out["missing_tree_path"] = error_of(lambda: list(api.list_repo_tree("tester/demo", path_in_repo="nothing")))
out["file_exists"] = [api.file_exists("tester/demo", "config.json"), api.file_exists("tester/demo", "nope.json")]
out["repo_exists"] = [api.repo_exists("tester/demo"), api.repo_exists("tester/absent")]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_url():
    with running_hub_server() as url:
        yield url


@pytest.fixture(scope="module")
def client_run(hub_url, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("hub-client")
    env = {**os.environ, **client_env(hub_url, str(work / "hf_home"))}
    proc = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, str(work)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_client_talks_to_the_loopback_server(client_run, hub_url):
    assert client_run["endpoint"] == hub_url and client_run["offline"] is False
    assert client_run["whoami"] == "gcmr-tester"
    assert client_run["repo_url"] == f"{hub_url}/tester/demo"
    assert client_run["create_again_exist_ok"] == f"{hub_url}/tester/demo"
    assert client_run["create_again"] == "HfHubHTTPError:409"


def test_commits_build_a_history(client_run):
    commits = [client_run[k] for k in ("first_commit", "second_commit", "third_commit")]
    assert len(set(commits)) == 3 and all(len(c) == 40 for c in commits)
    # Re-uploading identical content is detected through the preupload oid: no new commit.
    assert client_run["noop_commit"] == client_run["third_commit"] == client_run["sha"]


def test_repo_info_and_listings(client_run):
    expected = [".gitattributes", "config.json", "model.safetensors", "notes/hello.txt", "sub/deep.txt"]
    assert client_run["files"] == expected
    assert sorted(client_run["siblings"]) == expected
    assert client_run["siblings"]["notes/hello.txt"] == [len(b"hello v2\n"), git_blob_id(b"hello v2\n")]
    assert client_run["top_level"] == [
        [".gitattributes", "RepoFile"], ["config.json", "RepoFile"], ["model.safetensors", "RepoFile"],
        ["notes", "RepoFolder"], ["sub", "RepoFolder"],
    ]
    assert client_run["sub_listing"] == ["sub/deep.txt"]


def test_downloads_by_branch_and_by_commit(client_run):
    assert client_run["binary_ok"] is True
    assert client_run["hello_main"] == "hello v2\n"
    assert client_run["hello_first"] == "hello v1\n"
    assert client_run["snapshot_files"] == [".gitattributes", "config.json", "model.safetensors",
                                            "notes/hello.txt", "sub/deep.txt"]
    assert client_run["snapshot_deep"] == "deep"


def test_missing_things_raise_the_hub_errors(client_run):
    assert client_run["missing_file"] == "RemoteEntryNotFoundError"
    assert client_run["missing_repo"] == "RepositoryNotFoundError"
    assert client_run["missing_revision"] == "RevisionNotFoundError"
    assert client_run["missing_repo_info"] == "RepositoryNotFoundError"
    assert client_run["missing_tree_path"] == "RemoteEntryNotFoundError"
    assert client_run["file_exists"] == [True, False]
    assert client_run["repo_exists"] == [True, False]


def _request(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_raw_http_headers_and_write_protection(client_run, hub_url):
    status, headers, body = _request(f"{hub_url}/tester/demo/resolve/main/config.json", "HEAD")
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == client_run["sha"]
    content = json.dumps({"a": 1}).encode()
    assert headers["ETag"] == f'"{git_blob_id(content)}"' and headers["Content-Length"] == str(len(content))

    status, headers, body = _request(f"{hub_url}/tester/demo/resolve/main/config.json", headers={"Range": "bytes=2-4"})
    assert status == 206 and body == content[2:5] and headers["Content-Range"] == f"bytes 2-4/{len(content)}"

    status, headers, _ = _request(f"{hub_url}/tester/demo/resolve/main/absent.txt", "HEAD")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert headers["X-Repo-Commit"] == client_run["sha"]  # lets the client cache that the file does not exist
    status, headers, body = _request(f"{hub_url}/tester/demo/resolve/main/caf%C3%A9.txt")
    assert status == 404 and "caf\\xe9.txt" in headers["X-Error-Message"] and "café" in json.loads(body)["error"]

    # Writes need a token (any token), like on the Hub.
    payload = json.dumps({"name": "x", "organization": "tester"}).encode()
    status, _, body = _request(f"{hub_url}/api/repos/create", "POST", payload, {"Content-Type": "application/json"})
    assert status == 401 and b"credentials" in body
    status, _, body = _request(f"{hub_url}/api/repos/create", "POST", payload,
                               {"Content-Type": "application/json", "Authorization": "Bearer anything"})
    assert status == 200 and json.loads(body)["url"] == f"{hub_url}/tester/x"


def test_bad_commits_are_refused_with_a_clear_message(hub_url):
    auth = {"Authorization": "Bearer t", "Content-Type": "application/x-ndjson"}
    create = json.dumps({"name": "bad", "organization": "tester"}).encode()
    assert _request(f"{hub_url}/api/repos/create", "POST", create, auth)[0] == 200
    lines = [{"key": "header", "value": {"summary": "lfs"}},
             {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}}]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, body = _request(f"{hub_url}/api/models/tester/bad/commit/main", "POST", data, auth)
    assert status == 400 and b"LFS files are not accepted" in body
    traversal = [lines[0], {"key": "file", "value": {"path": "../x", "content": "", "encoding": "base64"}}]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in traversal)
    status, _, body = _request(f"{hub_url}/api/models/tester/bad/commit/main", "POST", data, auth)
    assert status == 400 and b"Invalid path in repo" in body
    stale = json.dumps({"key": "header", "value": {"summary": "stale", "parentCommit": "0" * 40}}).encode()
    status, _, body = _request(f"{hub_url}/api/models/tester/bad/commit/main", "POST", stale, auth)
    assert status == 412 and b"A commit happened since" in body
    status, _, body = _request(f"{hub_url}/api/models/tester/bad/revision/main")
    assert status == 200 and [s["rfilename"] for s in json.loads(body)["siblings"]] == [".gitattributes"]


def test_server_binds_loopback_only_and_stops():
    with running_hub_server() as url:
        assert url.startswith("http://127.0.0.1:")
        assert _request(f"{url}/api/models/nobody/none")[0] == 404
    with pytest.raises(urllib.error.URLError):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/api/models/x/y", timeout=2)

