"""MLflow tracking against a real sqlite store."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from so8t_exp.tracking import MetricBuffer, Tracker, flatten, mask_secrets
from tests.conftest import wait_for


def test_flatten_and_mask_secrets():
    flat = flatten(
        {
            "a": {"b": 1, "c": [1, 2]},
            "notify": {"hook": {"url": "https://x/y"}},
            "token": None,
            "e": {},
        }
    )
    assert flat == {
        "a.b": 1,
        "a.c": [1, 2],
        "notify.hook.url": "https://x/y",
        "token": None,
        "e": {},
    }
    masked = mask_secrets(
        {
            **flat,
            "x.api_key": "abc",
            "y.note": "hf_abcdef",
            "z.endpoint": "https://user:pw@host/x",
            "lr": 0.1,
        }
    )
    assert masked["notify.hook.url"] == "https://x/y"  # a URL is not a secret by its key alone
    assert masked["x.api_key"] == "***" and masked["y.note"] == "***"
    assert masked["z.endpoint"] == "***"
    assert masked["lr"] == "0.1" and masked["a.b"] == "1"


def test_metric_buffer_drops_steps_already_logged_and_retries_failures():
    sent: list[Metric] = []
    sent_tags: list[dict] = []
    failures = iter([True, False, False, False, False])
    lock = threading.Lock()

    def send(batch, tags):
        with lock:
            if next(failures, False):
                raise ConnectionError("server down")
            sent.extend(batch)
            sent_tags.append(dict(tags))

    buf = MetricBuffer(send, interval=3600, logged_steps={"train/loss": 5})
    buf.add({"train/loss": 1.0, "eval/loss": 2.0}, step=5)  # loss step 5 already logged
    buf.add({"train/loss": 0.9}, step=6)
    buf.add({"train/loss": 0.8}, step=6)  # same step twice: kept once
    buf.add_tags({"so8t.checkpoint.latest_step": 4}, now=False)
    assert buf.flush() is False and sent == []  # outage: nothing lost, tags neither
    buf.add_tags({"so8t.checkpoint.latest_step": 8, "skipped": None}, now=False)  # newer wins
    assert buf.flush() is True
    assert sent_tags == [{"so8t.checkpoint.latest_step": "8"}]  # with the batch, once
    buf.add_tags({"so8t.checkpoint.latest": "x"}, now=False)
    assert buf.flush() is True and sent_tags[-1] == {"so8t.checkpoint.latest": "x"}
    buf.close()
    assert sorted((m.key, m.step, m.value) for m in sent) == [
        ("eval/loss", 5, 2.0),
        ("train/loss", 6, 0.9),
    ]


def test_checkpoint_tags_do_not_wait_for_the_timer():
    """A trainer killed within the flush interval must not leave a mirrored checkpoint's tags
    unsent: they go at once, with the points pending, in one call."""
    calls: list[tuple[list, dict]] = []
    buf = MetricBuffer(lambda batch, tags: calls.append((batch, dict(tags))), interval=3600)
    buf.add({"train/loss": 0.5}, step=1)
    buf.add_tags({"so8t.checkpoint.latest": "rolling-step00000004"})
    wait_for(lambda: calls, timeout=10, what="the tags sent without a flush")
    [(batch, tags)] = calls
    assert [m.key for m in batch] == ["train/loss"]
    assert tags == {"so8t.checkpoint.latest": "rolling-step00000004"}
    buf.close()


def test_tracker_run_lifecycle_and_reattach(tmp_path: Path, store: str):
    tracker = Tracker(store, flush_interval=0.05)
    run_id = tracker.start("exp", "first")
    tracker.log_params({"trainer.lr": 0.1, "notify.webhook.url": "https://secret"})
    tracker.set_tags(tracker.standard_tags(tmp_path))
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.finish("KILLED")
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.params == {"trainer.lr": "0.1", "notify.webhook.url": "***"}
    assert run.data.tags["so8t.session_dir"] == str(tmp_path.resolve())
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    # the artifact store sits beside the database, as a file URI
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").resolve().as_uri())

    again = Tracker(store, flush_interval=0.05)
    assert again.find_session_run("exp", tmp_path) == run_id
    again.start("exp", None, run_id=run_id)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert again.logged_steps() == {"train/loss": 3}
    for step in range(1, 6):
        again.log_metrics({"train/loss": 1.0 / step}, step)
    again.log_params({"trainer.lr": 0.1})  # same value again: no error
    again.finish("FINISHED")
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert again.find_session_run("exp", tmp_path) == "FINISHED"
    assert again.find_session_run("exp", tmp_path / "other") is None


def test_checkpoint_mirror_round_trip(tmp_path: Path, store: str):
    tracker = Tracker(store)
    tracker.start("exp", None)
    folder = tmp_path / "rolling-step00000003"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"x" * 100)
    (folder / "manifest.json").write_text("{}")
    assert tracker.upload_checkpoint(folder)
    assert tracker.list_checkpoints() == ["rolling-step00000003"]
    # a local artifact store gets hard links: no second copy on the same disk ...
    copy = Path(tracker._artifact_repo().artifact_dir) / "checkpoints" / folder.name
    assert (copy / "a.safetensors").stat().st_ino == (folder / "a.safetensors").stat().st_ino
    assert sorted(p.name for p in copy.iterdir()) == ["a.safetensors", "manifest.json"]
    shutil.rmtree(folder)  # ... that outlive the local checkpoint's pruning
    assert (copy / "a.safetensors").read_bytes() == b"x" * 100
    dest = tmp_path / "restore" / "rolling-step00000003"
    dest.parent.mkdir()
    assert tracker.download_checkpoint("rolling-step00000003", dest)
    assert (dest / "a.safetensors").read_bytes() == b"x" * 100
    assert tracker.delete_checkpoint("rolling-step00000003")
    assert tracker.list_checkpoints() == []
    assert not tracker.download_checkpoint("rolling-step00000003", tmp_path / "gone")
    tracker.finish("FINISHED")


def test_metric_batches_sent_by_the_sender_process_survive_its_death(store: str):
    """``metrics_process``: a real helper process makes the ``log_batch`` calls; killed, it
    costs one flush (the points are kept, sent by the next one, each once)."""
    tracker = Tracker(store, flush_interval=3600, metrics_process=True)
    run_id = tracker.start("exp", "sender")
    tracker.log_metrics({"train/loss": 1.0, "train/lr": float("nan")}, 1)
    tracker.checkpoint_mirrored("rolling-step00000001", 1)
    assert tracker.metrics.flush() is True
    sender = tracker._sender.pid
    assert sender not in (None, os.getpid())
    client = MlflowClient(store)
    assert client.get_run(run_id).data.tags["so8t.checkpoint.latest_step"] == "1"
    os.kill(sender, signal.SIGKILL)
    tracker.log_metrics({"train/loss": 0.5}, 2)
    # The next flush may still find the pipe open: it fails (points kept) or starts anew.
    if not tracker.metrics.flush():
        assert tracker.metrics.flush() is True
    assert tracker._sender.pid != sender
    tracker.log_metrics({"train/loss": 0.25}, 3)
    tracker.finish("FINISHED")
    assert tracker._sender.pid is None  # (ended with the run)
    loss = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(loss) == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_tag_written_by_two_processes_at_once_is_retried_as_an_update(store: str):
    """The race itself (two launchers' read-then-insert on one sqlite store) cannot be timed
    here on demand; the client below lets the real store's first insert collide once, as the
    slower writer's does, and the real store then takes the retry."""
    from mlflow.exceptions import MlflowException

    from so8t_exp.tracking.errors import set_tag_racing

    real = MlflowClient(store)
    run_id = real.create_run(real.create_experiment("race")).info.run_id
    calls = []

    class Colliding(MlflowClient):
        def set_tag(self, run_id, key, value, **kw):
            calls.append(key)
            if len(calls) == 1:
                real.set_tag(run_id, key, "other launcher")  # the faster writer's row
                raise MlflowException("UNIQUE constraint failed: tags.key, tags.run_uuid")
            return super().set_tag(run_id, key, value, **kw)

    set_tag_racing(Colliding(store), run_id, "so8t.sweep.resumed", "2")
    assert real.get_run(run_id).data.tags["so8t.sweep.resumed"] == "2" and len(calls) == 2
    with pytest.raises(MlflowException, match="RESOURCE|not found|Run"):
        set_tag_racing(real, "0" * 32, "k", "v")  # any other error is not swallowed
