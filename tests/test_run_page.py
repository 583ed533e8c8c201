"""Run pages that explain themselves: names, descriptions, provenance, sweep parents and
masking, against a real sqlite store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from so8t_exp import sessions
from so8t_exp.config import ResumeConfig
from so8t_exp.launcher import judge
from so8t_exp.tracking import Tracker, mask_secrets
from so8t_exp.tracking.describe import NOTE, base_name, command_line, short_override
from so8t_exp.tracking.run_page import RunPage
from so8t_exp.tracking.runs import RunRegistry
from so8t_exp.tracking.sweep import (
    ENDED,
    PARENT_RUN,
    SweepJob,
    close_parent,
    open_parent,
)


def test_names_from_overrides():
    assert short_override("trainer.optimizer.lr=2e-4") == "lr=2e-4"
    assert short_override("+experiment=smoke") == "smoke"
    assert short_override("tracking.uri=sqlite:///x") is None  # bookkeeping, not the model
    assert short_override("checkpoint.every_n_steps=4") is None
    assert short_override("hydra.run.dir=/x") is None
    assert short_override("notify.notifiers.webhook.token=abc") is None
    long = short_override("data.files=[/a/very/long/path/to/some/folder/with/data.jsonl]")
    assert long.startswith("files=…") and long.endswith("/with/data.jsonl]")  # the end tells
    assert len(long.partition("=")[2]) == 40
    overrides = ["seed=7", "+experiment=borea", "trainer.optimizer.lr=2e-4", "tracking.uri=x"]
    assert base_name(overrides) == "borea seed=7 lr=2e-4"
    assert base_name([]) == "default" and base_name(["tracking.uri=x"]) == "default"
    assert base_name(["a.b=1,2"], "multirun") == "multirun b=1,2"
    cmd = command_line(["seed=7", "notify.notifiers.webhook.url=https://h/hooks/T1/B2/xyz"])
    assert cmd == "python -m so8t_exp.train seed=7 'notify.notifiers.webhook.url=***'"
    assert command_line(["a=1,2"], multirun=True) == "python -m so8t_exp.train -m a=1,2"


def test_masking_is_narrow():
    masked = mask_secrets(
        {
            "model.source.tokenizer_path": "/models/tok",
            "tracking.uri": "sqlite:////home/u/mlruns/mlflow.db",
            "notify.notifiers.webhook.url_env": "SO8T_WEBHOOK_URL",
            "trainer.max_tokens": 512,
            "notify.notifiers.webhook.url": "https://hooks.slack.com/services/T00/B00/XXXXabc",
            "notify.notifiers.ntfy.url": "https://ntfy.sh/topic?auth=c2VjcmV0",
            "notify.notifiers.plain.url": "https://example.com/status",
            "notify.notifiers.slack.endpoint": "https://hooks.slack.com/services/T0/B0/X",
            "docs.url": "https://example.com/services/hooks-guide",
            "notify.notifiers.chat.endpoint": "https://discord.com/api/webhooks/123/abcDEF",
            "hub.hf_token": "abc",
            "x.api_key": "abc",
            "x.password": "pw",
            "x.credentials": "c",
            "x.secret": "s",
            "tracking.server": "https://user:pw@mlflow.example.com",
            "y.note": "hf_abcdef",
            "z.empty_token": None,
        }
    )
    visible = {
        "model.source.tokenizer_path": "/models/tok",
        "tracking.uri": "sqlite:////home/u/mlruns/mlflow.db",
        "notify.notifiers.webhook.url_env": "SO8T_WEBHOOK_URL",
        "trainer.max_tokens": "512",
        "notify.notifiers.plain.url": "https://example.com/status",
        "docs.url": "https://example.com/services/hooks-guide",
        "z.empty_token": "None",
    }
    assert {k: v for k, v in masked.items() if v != "***"} == visible


def page(tracker: Tracker, tmp_path: Path, name: str | None = None, hydra_dir=None) -> RunPage:
    tracking = SimpleNamespace(experiment="so8t", run_name=name)
    return RunPage(tracker, tracking, tmp_path / "session", hydra_dir)


def test_run_page_names_describes_resumes_and_ends(tmp_path: Path, store: str):
    client = MlflowClient(store)
    overrides = ["+experiment=smoke", "seed=7", f"tracking.uri={store}"]
    first = page(Tracker(store), tmp_path)
    run_id = first.open(None, 0, overrides)
    first.finish("KILLED", step=3)
    run = client.get_run(run_id)
    assert run.info.run_name == "smoke seed=7"
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "so8t_exp.train"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] == run.info.user_id and tags["mlflow.user"] != "unknown"
    assert tags["so8t.step"] == "3"
    kind = client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI's "Machine learning" runs view
    note = tags[NOTE]
    assert note.startswith(
        f"`python -m so8t_exp.train +experiment=smoke seed=7 tracking.uri={store}`"
    )
    assert f"session folder: `{tmp_path / 'session'}`" in note
    assert note.splitlines()[-1].endswith("started on " + note.split(" on ")[-1])
    # the same overrides again: a different, still unique name; an explicit name wins
    again = [page(Tracker(store), tmp_path).open(None, 0, overrides) for _ in range(2)]
    assert [client.get_run(r).info.run_name for r in again] == [
        "smoke seed=7 #2",
        "smoke seed=7 #3",
    ]
    chosen = page(Tracker(store), tmp_path, name="mine").open(None, 0, overrides)
    assert client.get_run(chosen).info.run_name == "mine"
    # a resume keeps name and description, adding one line
    resumed = page(Tracker(store), tmp_path)
    resumed.open(run_id, 3, ["other=1"])
    resumed.finish("FINISHED", step=5)
    run = client.get_run(run_id)
    assert run.info.run_name == "smoke seed=7" and run.info.status == "FINISHED"
    lines = run.data.tags[NOTE].splitlines()
    assert lines[: len(note.splitlines())] == note.splitlines()
    assert " resumed from step 3 on " in lines[-1] and len(lines) == len(note.splitlines()) + 1
    assert run.data.tags["so8t.step"] == "5"


def test_epoch_tags_have_iso_twins(tmp_path: Path, store: str):
    tracker = Tracker(store)
    tracker.start("so8t", "t")
    tracker.heartbeat(4)
    tracker.checkpoint_mirrored("rolling-step00000004", 4)
    tracker.metrics.flush()  # (checkpoint tags ride along with the next metric batch)
    registry = RunRegistry(store)
    assert registry.claim(tracker.run_id, "h:1:me", 0)
    tags = MlflowClient(store).get_run(tracker.run_id).data.tags
    for key in ("so8t.heartbeat", "so8t.checkpoint.latest_time", "so8t.resume.claim_time"):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(float(tags[key])))
        assert tags[f"{key}_iso"] == stamp, key
    assert tags["so8t.step"] == "4"
    tracker.finish("FINISHED")


def child(tmp_path: Path, store: str, parent, num: int, status: str) -> str:
    """A sweep job's run, made as the trainer makes it (job file in its .hydra folder)."""
    hydra_dir = tmp_path / "sweep" / str(num) / ".hydra"
    SweepJob(parent.info.run_id, parent.info.run_name, num, [f"a={num}"], "/s").write(hydra_dir)
    p = page(Tracker(store), tmp_path, hydra_dir=hydra_dir)
    run_id = p.open(None, 0, [f"a={num}"])
    p.finish(status, step=1)
    return run_id


def test_sweep_parent_lifecycle(tmp_path: Path, store: str):
    client = MlflowClient(store)
    sweep_dir = tmp_path / "sweep"
    parent = open_parent(store, "so8t", sweep_dir, ["+experiment=smoke", "a=0,1"])
    assert parent.info.run_name == "multirun smoke a=0,1" and parent.info.status == "RUNNING"
    assert "python -m so8t_exp.train -m +experiment=smoke a=0,1" in parent.data.tags[NOTE]
    ok = child(tmp_path, store, parent, 0, "FINISHED")
    bad = child(tmp_path, store, parent, 1, "FAILED")
    tags = client.get_run(bad).data.tags
    assert tags[PARENT_RUN] == parent.info.run_id
    assert tags["so8t.job.num"] == "1" and tags["so8t.job.overrides"] == "a=1"
    assert "job 1 of `multirun smoke a=0,1`" in tags[NOTE]
    assert close_parent(store, parent.info.run_id) == "FAILED"  # went through, one failed
    assert ENDED in client.get_run(parent.info.run_id).data.tags
    # the failed job resumed on its own (the launcher): same parent, which now finishes
    hydra_dir = tmp_path / "sweep" / "1" / ".hydra"
    resumed = page(Tracker(store), tmp_path, hydra_dir=hydra_dir)
    resumed.open(bad, 1)
    resumed.finish("FINISHED", step=2)
    parent_run = client.get_run(parent.info.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["so8t.sweep.children"] == "2 finished"
    assert client.get_run(bad).data.tags[PARENT_RUN] == parent.info.run_id
    # the same sweep started again: the same parent, reopened; stopped: KILLED
    again = open_parent(store, "so8t", sweep_dir, ["+experiment=smoke", "a=0,1"])
    assert again.info.run_id == parent.info.run_id and again.info.status == "RUNNING"
    assert ENDED not in again.data.tags and " continued on " in again.data.tags[NOTE]
    assert close_parent(store, again.info.run_id, "KILLED") == "KILLED"
    exp = client.get_experiment_by_name("so8t").experiment_id
    assert len(client.search_runs([exp])) == 3
    assert {ok, bad} == {r.run_id for r in RunRegistry(store).runs(["so8t"], False)}


def test_sweep_parent_is_never_resumed_nor_listed(tmp_path: Path, store: str, capsys):
    parent = open_parent(store, "so8t", tmp_path / "sweep", ["a=1,2"])
    close_parent(store, parent.info.run_id, "KILLED")
    registry = RunRegistry(store)
    assert registry.runs(["so8t"]) == [] and registry.runs(["so8t"], False) == []
    decision = judge(registry.get(parent.info.run_id), ResumeConfig())
    assert decision.action == "skip" and "sweep" in decision.reason
    assert sessions.main(["--tracking-uri", store]) == 0
    assert capsys.readouterr().out.strip() == "no sessions"


@pytest.mark.parametrize("broken", ["{", json.dumps({"parent_run_id": "x"})])
def test_unreadable_job_file_is_no_sweep(tmp_path: Path, broken: str):
    (tmp_path / "sweep.json").write_text(broken)
    assert SweepJob.read(tmp_path) is None
    assert SweepJob.read(None) is None
