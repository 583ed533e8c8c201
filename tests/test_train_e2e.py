"""End to end: ``python -m so8t_exp.train`` in subprocesses against a real sqlite store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import history, only_run, run_train, session_info, subprocess_env, sweep_cmd

pytestmark = pytest.mark.slow


def test_smoke_run_is_tracked_completely(tmp_path: Path, store: str):
    run_dir = tmp_path / "run"
    out = run_train(
        tmp_path,
        store,
        run_dir,
        "+experiment=smoke",
        "trainer.max_steps=16",
        "tracking.system_stats_interval_seconds=0.2",
        "progress.interval_seconds=0.5",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    client, run = only_run(store)
    assert run.info.status == "FINISHED"
    loss = history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 17))
    assert loss[-1][1] < loss[0][1]
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "train/alpha",
        "train/pet_loss",
        "so8t/ortho_error",
        "so8t/det_error",
        "eval/loss",
        "eval/perplexity",
        "eval/macro_f1",
        "eval/ece",
        "eval/refuse_recall",
        "eval/accuracy",
        "eval/head_loss",
        "eval/recall_allow",
        "eval/recall_escalation",
        "eval/recall_deny",
        "train/head_loss",
        "train/skipped_steps",
        "system/cpu_percent",
        "system/ram_used_gb",
        "system/process_rss_gb",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["so8t/ortho_error"] < 1e-4
    assert run.data.metrics["train/skipped_steps"] == 0
    assert [s for s, _ in history(client, run.info.run_id, "eval/macro_f1")] == [6, 12, 16]
    params = run.data.params
    assert params["trainer.max_steps"] == "16" and params["seed"] == "42"
    assert params["model.source._target_"] == "so8t_exp.model_sources.TinyPhi3"
    assert run.data.tags["so8t.session_dir"] == str(run_dir.resolve())
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert arts == {"hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml"}
    final = {a.path for a in client.list_artifacts(run.info.run_id, "final_model")}
    assert {
        "final_model/adapter_model.safetensors",
        "final_model/config.yaml",
        "final_model/tokenizer",
        "final_model/base_model.json",
        "final_model/so8t.json",
    } <= final
    so8t_state = json.loads((run_dir / "final_model" / "so8t.json").read_text())
    assert so8t_state["alpha"] == pytest.approx(run.data.metrics["train/alpha"], rel=1e-6)
    assert so8t_state["safety_head"]["labels"] == ["ALLOW", "ESCALATION", "DENY", "REFUSE"]
    assert (run_dir / "final_model" / "tokenizer" / "chat_template.jinja").is_file()
    evals = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert evals == {"eval/confusion_matrix.json", "eval/confusion_matrix.png"}
    report = json.loads((run_dir / "eval" / "confusion_matrix.json").read_text())
    # the whole validation split (every sample record has a label), not a few batches
    assert sum(map(sum, report["matrix"])) == int(params["data.val_records"])
    assert report["step"] == 16
    assert (run_dir / "eval" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert params["data.too_long_records"] == "0"
    # the data file as a dataset input, digest from its sha256
    datasets = [d.dataset for d in client.get_run(run.info.run_id).inputs.dataset_inputs]
    assert [d.name for d in datasets] == ["so8t_sample.jsonl"]
    assert params["data.files_sha256.0"].startswith(datasets[0].digest)
    # the final state exported and logged as the run's MLflow model (tracking.log_models)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]
    assert (run_dir / "export" / "final-step00000016" / "model.safetensors").is_file()
    labels = dict(kv.split(":") for kv in params["data.val_labels"].split())
    assert sum(map(int, labels.values())) == int(params["data.val_records"])
    assert [sum(row) for row in report["matrix"]] == [int(labels[k]) for k in report["labels"]]
    info = session_info(run_dir)
    assert info["session_id"] == run.info.run_id and info["status"] == "completed"
    assert info["current_step"] == 16 and info["total_steps"] == 16
    # eval/loss fell all the way: the best evaluation is the last one
    assert sorted(info["checkpoints"]) == ["best-step00000016", "final-step00000016"]
    assert info["best_checkpoint"] == "best-step00000016"
    assert info["best_loss"] == run.data.metrics["eval/loss"]
    progress = (run_dir / "progress_logs" / "progress.jsonl").read_text().splitlines()
    assert len(progress) >= 2 and "system/cpu_percent" in json.loads(progress[-1])

    again = run_train(tmp_path, store, run_dir, "+experiment=smoke", "trainer.max_steps=16")
    assert again.returncode == 0 and "already completed" in again.stdout + again.stderr
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_bad_config_key_names_it_and_starts_nothing(tmp_path: Path, store: str):
    out = run_train(tmp_path, store, tmp_path / "run", "trainer.max_stepz=3")
    assert out.returncode != 0
    assert "max_stepz" in out.stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("skip", [False, True])
def test_bad_data_line_names_file_and_line(tmp_path: Path, store: str, skip: bool):
    good = [
        json.dumps(
            {
                "instruction": f"Say hi {i}",
                "input": "",
                "output": f"Hi {i}!",
                "four_class_label": "ALLOW",
            }
        )
        for i in range(42)
    ]
    data = tmp_path / "bad.jsonl"
    lines = good[:2] + ["{oops"] + good[2:]
    data.write_text("\n".join(lines) + "\n")
    overrides = ["+experiment=smoke", "trainer.max_steps=2", f"data.files=[{data}]"]
    if skip:
        overrides.append("data.on_bad_record=skip")
    out = run_train(tmp_path, store, tmp_path / "run", *overrides)
    if skip:
        assert out.returncode == 0, out.stderr[-2000:]
        _client, run = only_run(store)
        assert run.data.params["data.skipped_records"] == "1"
    else:
        assert out.returncode == 2
        assert f"{data}:3" in out.stderr and "invalid JSON" in out.stderr
        assert not (tmp_path / "mlruns").exists()


def test_diverging_training_fails_cleanly_with_the_last_good_state(tmp_path, store):
    """Non-finite steps are skipped; trainer.max_bad_steps in a row end the run FAILED with
    an emergency checkpoint whose weights are the last good step's. No nan is logged."""
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path, SO8T_FAULT_NAN_AT_STEPS="3,4,5")
    overrides = ["+experiment=smoke", "trainer.max_bad_steps=3", "checkpoint.every_n_steps=2"]
    out = run_train(tmp_path, store, run_dir, *overrides, env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "training diverged: 3 consecutive steps" in said
    assert "trainer.max_bad_steps=3" in said and "Traceback" not in said
    assert "failed at step 5: training diverged" in said  # the notification says why
    client, run = only_run(store)
    assert run.info.status == "FAILED"
    assert session_info(run_dir)["status"] == "failed"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == [1, 2]
    assert history(client, run.info.run_id, "train/skipped_steps") == [(3, 1), (4, 2), (5, 3)]
    for key in run.data.metrics:
        assert all(math.isfinite(v) for _, v in history(client, run.info.run_id, key)), key
    ckpts = run_dir / "checkpoints"
    good = load_file(ckpts / "rolling-step00000002" / "weights.safetensors")
    last = load_file(ckpts / "emergency-step00000005" / "weights.safetensors")
    assert good.keys() == last.keys()
    for key, tensor in good.items():
        assert torch.equal(last[key], tensor) and torch.isfinite(tensor).all(), key


def test_multirun_jobs_are_separate_runs_and_a_failure_does_not_break_the_next(tmp_path, store):
    env = subprocess_env(tmp_path, SO8T_FAULT_FAIL_AT_STEP="4")
    import subprocess

    out = subprocess.run(
        sweep_cmd(store, tmp_path / "sweep", "trainer.max_steps=6,3"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    client = MlflowClient(store)
    found = client.search_runs([client.get_experiment_by_name("so8t").experiment_id])
    [parent] = [r for r in found if r.data.tags.get("so8t.sweep.parent") == "true"]
    runs = [r for r in found if r is not parent]
    # job 0's exception ends the sweep once every job ran (Hydra re-raises it): FAILED
    assert parent.info.status == "FAILED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    by_steps = {r.data.params["trainer.max_steps"]: r for r in runs}
    assert sorted(by_steps) == ["3", "6"], out.stderr[-3000:]
    assert by_steps["6"].info.status == "FAILED"  # job 0 hit the injected fault at step 4
    assert by_steps["3"].info.status == "FINISHED"
    dirs = {r.data.tags["so8t.session_dir"] for r in runs}
    assert dirs == {str((tmp_path / "sweep" / n).resolve()) for n in ("0", "1")}
