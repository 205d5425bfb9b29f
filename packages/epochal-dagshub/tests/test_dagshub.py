"""DagsHubCallback against the real dagshub and mlflow SDKs, with no DagsHub account.

Tracking goes to a local MLflow store whose path ends in ``<owner>/<repo>`` (as a
DagsHub tracking URI does), read back with ``MlflowClient``. Uploads go to
:class:`FakeDagsHub`, a stand-in for the few REST endpoints ``dagshub.upload.Repo``
calls, on 127.0.0.1: DagsHub has no local mode for them, so this is the only fake.
"""

from __future__ import annotations

import email.parser
import email.policy
import http.server
import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from epochal_core.testing import scripted_run
from epochal_dagshub import DagsHubCallback, repository_of
from mlflow.tracking import MlflowClient


class FakeDagsHub:
    """The repository, branch and upload endpoints of DagsHub's API; uploads land in ``store``."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.uploads: list[tuple[str, dict[str, str], list[str]]] = []  # (path, form fields, files saved)
        self.tips: dict[str, str] = {}  # branch -> last commit
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if match := re.fullmatch(r"/api/v1/repos/([^/]+)/([^/]+)/branches/(.+)", path):
                    tip = fake.tips.get(match.group(3))
                    if tip is None:
                        return self._json(404, {"message": "branch not found"})
                    return self._json(200, {"name": match.group(3), "commit": {
                        "id": tip, "message": "upload", "url": "", "author": None, "committer": None, "added": None,
                        "removed": None, "modified": None, "timestamp": "2026-01-01T00:00:00Z"}})
                if match := re.fullmatch(r"/api/v1/repos/([^/]+)/([^/]+)", path):
                    return self._json(200, fake.repo_info(match.group(1), match.group(2)))
                return self._json(404, {"message": "not found"})

            def do_PUT(self) -> None:
                match = re.fullmatch(r"/api/v1/repos/[^/]+/[^/]+/content/([^/]+)/?(.*)", self.path.split("?")[0])
                if match is None:
                    return self._json(404, {"message": "not found"})
                branch, folder = match.groups()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                form, saved = {}, []
                for part in message.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    filename = part.get_param("filename", header="content-disposition")
                    payload = part.get_payload(decode=True)
                    if name == "files" and filename is not None:
                        target = fake.store / folder / filename
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(payload)
                        saved.append(f"{folder}/{filename}")
                    else:
                        form[str(name)] = payload.decode()
                fake.uploads.append((self.path, form, saved))
                fake.tips[branch] = fake.tips[form.get("new_branch_name") or branch] = uuid.uuid4().hex
                self.send_response(200)
                self.send_header("ETag", fake.tips[branch])
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def repo_info(self, owner: str, name: str) -> dict[str, Any]:
        user = {"id": 1, "login": owner, "full_name": owner, "avatar_url": None, "public_email": None,
                "website": None, "company": None, "description": None, "username": owner}
        return {"id": 7, "owner": user, "name": name, "full_name": f"{owner}/{name}", "description": "",
                "private": False, "fork": False, "parent": None, "empty": False, "mirror": False, "size": 0,
                "html_url": f"{self.url}/{owner}/{name}", "ssh_url": None,
                "clone_url": f"{self.url}/{owner}/{name}.git",
                "website": None, "stars_count": 0, "forks_count": 0, "watchers_count": 0, "open_issues_count": 0,
                "default_branch": "main", "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
                "permissions": None}


@pytest.fixture
def fake_dagshub(tmp_path: Path) -> Iterator[FakeDagsHub]:
    import dagshub.common.config as config

    fake = FakeDagsHub(tmp_path / "dagshub-store")
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    before = config.host
    config.set_host(fake.url)  # dagshub reads DAGSHUB_CLIENT_HOST once, at import
    try:
        yield fake
    finally:
        config.set_host(before)
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def repo_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A local MLflow store at ``.../alice/tiny-repo``, as ``MLFLOW_TRACKING_URI``."""
    uri = (tmp_path / "mlflow" / "alice" / "tiny-repo").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_EXPERIMENT_NAME", "HF_DAGSHUB_LOG_ARTIFACTS", "BRANCH"):
        monkeypatch.delenv(name, raising=False)
    return uri


@pytest.mark.slow
def test_logs_to_mlflow_and_uploads_output_dir_to_the_repository(
    repo_store: str, fake_dagshub: FakeDagsHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DAGSHUB_LOG_ARTIFACTS", "1")
    out = tmp_path / "out"
    callback = DagsHubCallback()
    run = scripted_run(callback, output_dir=out)

    assert (callback.repo.owner, callback.repo.name, callback.repo.branch) == ("alice", "tiny-repo", "main")
    client = MlflowClient(repo_store)
    got = client.get_run(str(callback.run_id))
    logged = [(key, m.step, m.value) for key in got.data.metrics
              for m in client.get_metric_history(got.info.run_id, key)]
    assert sorted(logged) == sorted((key, e["step"], float(value)) for e in run.state.log_history
                                    for key, value in e.items() if key != "step")
    assert got.data.params["max_steps"] == "10" and got.data.params["hidden_size"] == "8"
    assert got.info.status == "FINISHED"  # transformers' DagsHubCallback never ends its MLflow run

    # output_dir, uploaded under artifacts/ of the repository's main branch, byte for byte.
    saved = sorted(name for _, _, files in fake_dagshub.uploads for name in files)
    expected = sorted(f"artifacts/{p.relative_to(out).as_posix()}" for p in out.rglob("*") if p.is_file())
    assert saved == expected and "artifacts/checkpoint-10/pytorch_model.bin" in saved
    assert all("/repos/alice/tiny-repo/content/main/artifacts" in path for path, _, _ in fake_dagshub.uploads)
    assert all((fake_dagshub.store / name).read_bytes() == (out / name.removeprefix("artifacts/")).read_bytes()
               for name in saved)


def test_missing_repository_or_token_is_a_clear_error(
    repo_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DagsHubCallback.configuration_problem() is None  # the test environment has both
    monkeypatch.delenv("DAGSHUB_USER_TOKEN")
    problem = DagsHubCallback.configuration_problem()
    assert problem is not None and "a token: set DAGSHUB_USER_TOKEN" in problem and "repository" not in problem
    with pytest.raises(RuntimeError, match=r"DagsHubCallback needs a token: set DAGSHUB_USER_TOKEN"):
        scripted_run(DagsHubCallback(), output_dir=tmp_path / "a", max_steps=2)

    monkeypatch.setenv("DAGSHUB_USER_TOKEN", "dummy")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RuntimeError, match=r"needs the repository: set MLFLOW_TRACKING_URI=https://dagshub.com/"):
        scripted_run(DagsHubCallback(), output_dir=tmp_path / "b", max_steps=2)


def test_repository_is_read_from_the_tracking_uri() -> None:
    assert repository_of("https://dagshub.com/alice/my-repo.mlflow") == ("alice", "my-repo")
    assert repository_of("sqlite:////tmp/x/alice/tiny-repo.db") == ("alice", "tiny-repo")
    assert repository_of("file:///tmp/x/alice/tiny-repo") == ("alice", "tiny-repo")
    with pytest.raises(RuntimeError, match=r"cannot tell the repository from MLFLOW_TRACKING_URI='http://host/'"):
        repository_of("http://host/")
