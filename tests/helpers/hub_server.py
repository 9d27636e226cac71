"""Hugging Face Hub stand-ins: a real cache layout on disk, and a 127.0.0.1 server of the file API.

The server answers the requests `huggingface_hub.snapshot_download` makes, with the headers it reads:
- GET  /api/models/{repo}/revision/{rev}    -> {"id", "sha", "siblings"} (repo_info)
- GET  /api/models/{repo}/tree/{commit}     -> [{"type": "file", "path", "size", "oid"}]
- HEAD /{repo}/resolve/{commit}/{file}      -> X-Repo-Commit, ETag, Content-Length
- GET  /{repo}/resolve/{commit}/{file}      -> the bytes
Unknown repositories answer 404 with X-Error-Code: RepoNotFound, gated ones 401 GatedRepo, as the Hub.
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_hub_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = COMMIT,
                    ref: str = "main") -> Path:
    """Lay `folder` out as huggingface_hub caches a download: blobs named by their hash, the
    snapshot's files symlinks to them, refs/{ref} holding the commit. Returns the snapshot."""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo_dir / "blobs" / _sha(data)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * len(path.relative_to(folder).parts) + "../blobs") / blob.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


class _Handler(BaseHTTPRequestHandler):
    repos: dict[str, dict[str, bytes]]  # repo id -> file name -> bytes
    gated: set[str]
    requested: list[str]

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _error(self, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.requested.append(f"{self.command} {path}")
        api = path.startswith("/api/models/")
        parts = path[len("/api/models/"):].split("/") if api else path.lstrip("/").split("/")
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        if repo_id in self.gated:
            return self._error(401, "GatedRepo")
        files = self.repos.get(repo_id)
        if files is None:
            return self._error(404, "RepoNotFound")
        if api and rest[:1] == ["revision"]:
            if unquote(rest[1]) not in ("main", COMMIT):
                return self._error(404, "RevisionNotFound")
            return self._json({"id": repo_id, "sha": COMMIT,
                               "siblings": [{"rfilename": name} for name in files]})
        if api and rest[:1] == ["tree"]:
            return self._json([{"type": "file", "path": name, "size": len(data),
                                "oid": hashlib.sha1(data).hexdigest()}
                               for name, data in files.items()])
        if not api and rest[:1] == ["resolve"] and "/".join(rest[2:]) in files:
            data = files["/".join(rest[2:])]
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{_sha(data)}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return None
        return self._error(404, "EntryNotFound")


@contextmanager
def hub_server(repos: dict[str, Path | dict[str, bytes]], gated: set[str] = frozenset()):
    """Serve each repository (a folder, or {name: bytes}) on 127.0.0.1; yields (url, requests)."""
    contents = {}
    for repo_id, source in repos.items():
        if isinstance(source, Path):
            source = {str(p.relative_to(source)): p.read_bytes()
                      for p in sorted(source.rglob("*")) if p.is_file()}
        contents[repo_id] = source
    requested: list[str] = []
    handler = type("Handler", (_Handler,), {"repos": contents, "gated": set(gated),
                                            "requested": requested})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


