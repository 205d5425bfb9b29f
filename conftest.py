"""Session-wide test hygiene for every package: hermetic, offline, strict.

Runs before any test module (and so before any tracker SDK) is imported:
HOME, TMPDIR and every SDK directory point into one temp folder, each SDK is
put in its offline mode with its phone-home switches off, non-loopback network
access raises, and integration errors re-raise (strict mode).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="epochal-tests-"))


def _offline_env(root: Path) -> dict[str, str]:
    return {
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "EPOCHAL_STRICT_INTEGRATIONS": "1",
        "DO_NOT_TRACK": "true",
        "MPLCONFIGDIR": str(root / "mplconfig"),
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        # comet
        "COMET_OFFLINE_DIRECTORY": str(root / "comet_offline"),
        "COMET_START_ONLINE": "false",
        "COMET_DISABLE_AUTO_LOGGING": "1",
        "COMET_ERROR_TRACKING_ENABLE": "false",
        "COMET_AUTO_LOG_ENV_DETAILS": "false",
        # neptune
        "NEPTUNE_MODE": "offline",
        "NEPTUNE_DATA_DIRECTORY": str(root / "neptune_data"),
        # dvc / dvclive
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "1",
        "DVC_SITE_CACHE_DIR": str(root / "dvc_site_cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(root / "dvc_global_config"),
        "DVC_SYSTEM_CONFIG_DIR": str(root / "dvc_system_config"),
        # wandb: offline, its files under the temp folder; no error reporting (its OTel probe of
        # api.forge.coreweave.com holds exit for 10 s on a network that drops packets), no console
        # capture, system stats, git or code capture.
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),
        "WANDB_ARTIFACT_DIR": str(root / "wandb_artifacts"),
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_X_DISABLE_MACHINE_INFO": "true",
        # mlflow: no telemetry (mlflow honours only the literal "true"), a local file store (the default
        # would be ./mlflow.db plus ./mlruns, and a fresh SQLite store costs seconds of migrations),
        # no progress bars. The path ends in <owner>/<repo> so DagsHub can tell its repository from it.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_TRACKING_URI": (root / "mlruns" / "epochal" / "tests").as_uri(),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # dagshub: a dummy token (without one it starts a browser login), its API on a closed
        # loopback port (tests that upload start their own stand-in), its token cache in the temp folder.
        "DAGSHUB_USER_TOKEN": "dummy-token-for-tests",
        "DAGSHUB_CLIENT_HOST": "http://127.0.0.1:9",
        "DAGSHUB_CLIENT_TOKENS_CACHE": str(root / "dagshub_tokens"),
        "DAGSHUB_QUIET": "1",
        # clearml: offline sessions (and its session file) under the cache dir, not ~/.clearml
        "CLEARML_OFFLINE_MODE": "1",
        "CLEARML_CACHE_DIR": str(root / "clearml_cache"),
        # codecarbon: quiet; the integration always uses the offline tracker (no geolocation lookup)
        "CODECARBON_LOG_LEVEL": "error",
        # flytekit: its import-time sandbox goes under TMPDIR (set above); no INFO chatter
        "FLYTE_SDK_LOGGING_LEVEL": "40",
    }


for _key, _value in _offline_env(_ROOT).items():
    os.environ[_key] = _value
# AzureML: with none of its run variables set, Run.get_context() is the offline run that prints.
for _key in [k for k in os.environ if k.startswith("AZUREML_")]:
    del os.environ[_key]
for _sub in ("home", "tmp", "mplconfig"):
    (_ROOT / _sub).mkdir(parents=True, exist_ok=True)
tempfile.tempdir = None  # re-read TMPDIR

_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}


def _is_loopback(host: object) -> bool:
    return host is None or str(host) in _LOOPBACK or str(host).startswith("127.")


def _guarded_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    if not _is_loopback(host):
        raise OSError(f"tests must not reach the network (lookup of {host!r} blocked)")
    return _real_getaddrinfo(host, *args, **kwargs)


def _guarded_connect(self, address):  # type: ignore[no-untyped-def]
    if isinstance(address, tuple) and not _is_loopback(address[0]):
        raise OSError(f"tests must not reach the network (connect to {address!r} blocked)")
    return _real_connect(self, address)


socket.getaddrinfo = _guarded_getaddrinfo
socket.socket.connect = _guarded_connect  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _run_in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SDKs drop files in the CWD by default; keep them out of the checkout.
    monkeypatch.chdir(tmp_path)
