"""What ``serve.model`` can name — a registered version by alias or number, a run id, an
export, an MLflow model folder — against a real sqlite MLflow store; and the one-line
errors of ``python -m so8t_exp.serve`` for a model or config that is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from so8t_exp.config import ConfigError
from so8t_exp.export.write import RUNTIME_FILE
from so8t_exp.paths import sqlite_uri
from so8t_exp.serve.source import resolve
from so8t_exp.tracking import models
from tests.conftest import subprocess_env
from tests.serve_support import Server, make_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """An export logged as a run's MLflow model and registered as so8t-tiny v1 @champion."""
    tmp = tmp_path_factory.mktemp("registry")
    export = make_export(tmp / "export")
    store = sqlite_uri(tmp / "mlruns" / "mlflow.db")
    client = MlflowClient(store)
    experiment = client.create_experiment("so8t", artifact_location=(tmp / "art").as_uri())
    run = client.create_run(experiment, run_name="tiny")
    code = Path(models.__file__).with_name("pyfunc_model.py")
    uri = models.log_pyfunc_model(store, run.info.run_id, export, code, export / RUNTIME_FILE)
    models.register_version(
        store, "so8t tiny", uri, run.info.run_id, ("eval/loss", 1.0, "min"), "champion"
    )
    client.set_terminated(run.info.run_id)
    return {"tmp": tmp, "store": store, "run_id": run.info.run_id, "export": export}


def test_a_registered_alias_is_downloaded_once_into_the_cache(registry, tmp_path):
    cache = tmp_path / "cache"
    served = resolve("models:/so8t tiny@champion", registry["store"], str(cache))
    assert (served.name, served.version) == ("so8t tiny", "1")
    assert (served.folder / "config.json").is_file() and (
        served.folder / "safety_head.json"
    ).is_file()
    [folder] = cache.iterdir()  # <name>-<hash of registry and name>, then the version
    assert folder.name.startswith("so8t tiny-") and served.folder.is_relative_to(folder / "1")
    stamp = (served.folder / "config.json").stat().st_mtime_ns
    again = resolve("models:/so8t tiny/1", registry["store"], str(cache))
    assert again.folder == served.folder
    assert (again.folder / "config.json").stat().st_mtime_ns == stamp  # not downloaded again
    assert sorted(p.name for p in folder.iterdir()) == ["1", "1.lock"]  # no leftovers


def test_a_run_id_serves_its_logged_model(registry, tmp_path):
    served = resolve(registry["run_id"], registry["store"], str(tmp_path / "cache"))
    assert served.name == "tiny" and (served.folder / "config.json").is_file()
    assert served.folder.is_relative_to(tmp_path / "cache" / "runs" / registry["run_id"])


def test_folders_an_export_or_an_mlflow_model(registry, tmp_path):
    served = resolve(str(registry["export"]), None, str(tmp_path))
    assert served.folder == registry["export"] and served.version == "untrained"
    inner = resolve("models:/so8t tiny/1", registry["store"], str(tmp_path / "c")).folder
    [folder] = (tmp_path / "c").iterdir()
    mlmodel = folder / "1"
    assert (mlmodel / "MLmodel").is_file()
    assert resolve(str(mlmodel), None, str(tmp_path)).folder == inner


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("models:/nope@champion", "not in the registry"),
        ("models:/so8t tiny@nope", "not in the registry"),
        ("models:/so8t tiny/x", "models:/<name>@<alias>"),
        ("0123456789abcdef0123456789abcdef", "neither a folder nor a run"),
        ("no/such/folder", "not models:/"),
    ],
)
def test_a_model_that_is_not_there_is_a_config_error(registry, tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve(spec, registry["store"], str(tmp_path))


def test_the_server_serves_a_registered_alias_to_token_holders(registry, tmp_path):
    srv = Server(
        tmp_path,
        subprocess_env(tmp_path, SO8T_TEST_TOKEN="s3cret-token"),
        "serve.model=models:/so8t tiny@champion",
        "serve.auth_token_env=SO8T_TEST_TOKEN",
        f"tracking.uri={registry['store']}",
        f"serve.audit.path={tmp_path / 'audit.db'}",
    )
    try:
        status, health, _ = srv.call("GET", "/health")
        assert status == 200 and (health["model"], health["version"]) == ("so8t tiny", "1")
        ask = {"query": "How do I reset my password?", "max_new_tokens": 4}
        status, body, headers = srv.call("POST", "/think", ask)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", body
        wrong = srv.think(ask, Authorization="Bearer nope")[0]
        assert srv.think(ask, Authorization="Bearer é")[0] == 401  # not ASCII: no 500
        status, body = srv.think(ask, Authorization="Bearer s3cret-token")
        assert wrong == 401 and status == 200 and body["safety_label"] in health["safety_labels"]
        assert "s3cret-token" not in srv.output()
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("serve.model=no/such/folder", "error: serve.model=no/such/folder: not models:/"),
        ("serve.modle=x", "serve.modle"),
        ("serve.limits.max_concurrent=0", "serve.limits.max_concurrent=0"),
    ],
)
def test_a_bad_command_is_one_line_and_exit_2(tmp_path, override, message):
    cmd = [sys.executable, "-m", "so8t_exp.serve", override]
    if not override.startswith("serve.model="):
        cmd.append(f"serve.model={tmp_path}")
    out = subprocess.run(
        cmd, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr


def test_a_run_without_a_logged_model_and_its_session_folder_are_exported(tmp_path):
    from tests.conftest import only_run, run_train

    store = sqlite_uri(tmp_path / "mlruns" / "mlflow.db")
    smoke = ("+experiment=smoke", "trainer.max_steps=2", "tracking.log_models=[]")
    out = run_train(tmp_path, store, tmp_path / "run", *smoke)
    assert out.returncode == 0, out.stderr[-3000:]
    _client, run = only_run(store)
    served = resolve(run.info.run_id, store, str(tmp_path / "cache"))
    assert served.folder == tmp_path / "run" / "export" / "final-step00000002"
    assert (served.folder / "safety_head.json").is_file()
    assert served.version == f"{run.info.run_id[:8]}/final-step00000002"
    again = resolve(str(tmp_path / "run"), None, str(tmp_path / "cache"))
    assert again.folder == served.folder
