"""Export end to end: a trained run (LoRA on o_proj and the SO8T adapters in front of it)
becomes a plain Hugging Face folder that a process without so8t_exp loads and that gives
the framework's logits; it is logged as an MLflow model and registered with an alias."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from so8t_exp import chat, data
from so8t_exp.export.locate import locate
from so8t_exp.export.merge import rebuild
from so8t_exp.paths import sqlite_uri
from tests.conftest import only_run, run_train, subprocess_env

pytestmark = pytest.mark.slow

TRAIN = (
    "+experiment=smoke",
    "trainer.max_steps=12",
    "model.lora.enabled=true",  # targets qkv_proj, o_proj, gate_up_proj, down_proj
    "model.lora.dropout=0.0",
    "model.so8t.layers=all",
    # the highest eval loss is the first evaluation's: the best checkpoint is step 6
    "checkpoint.best_mode=max",
)

# Runs where so8t_exp cannot be imported: loads the export as any HF user would.
OUTSIDE = r"""
import json, sys
sys.modules["so8t_exp"] = None  # importing it now fails: nothing below may need it
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts_file, out_file = sys.argv[1:4]
sys.path.insert(0, folder)
from so8t_safety_head import SO8TChat
chat = SO8TChat(folder)
prompts = json.load(open(prompts_file, encoding="utf-8"))
logits, greedy = [], []
with torch.no_grad():
    for p in prompts:
        ids = chat.prompt_ids(p)
        logits.append(chat.model(ids).logits[0])
        greedy.append(chat.model.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist())
torch.save({"logits": logits, "greedy": greedy, "labels": chat.classify(prompts)}, out_file)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("export")
    store = sqlite_uri(tmp / "mlflow.db")
    out = run_train(tmp, store, tmp / "run", *TRAIN)
    assert out.returncode == 0, out.stderr[-3000:]
    _client, run = only_run(store)
    return {"tmp": tmp, "store": store, "dir": tmp / "run", "run_id": run.info.run_id}


def export(trained: dict, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "so8t_exp.export", f"tracking.uri={trained['store']}"]
    env = subprocess_env(trained["tmp"])
    return subprocess.run(
        [*cmd, *overrides], cwd=trained["tmp"], env=env, capture_output=True, text=True
    )


def val_prompts(cfg, n: int = 4) -> list[str]:
    return [r.prompt for r in data.load_dataset(cfg.data).val[:n]]


def test_export_loads_without_so8t_exp_and_gives_the_same_logits(trained, tmp_path):
    folder = tmp_path / "export"
    out = export(trained, f"export.source={trained['dir']}", f"export.out={folder}")
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((folder / "so8t_export.json").read_text())
    assert info["checkpoint"] == "final-step00000012" and info["run_id"] == trained["run_id"]
    names = set(load_file(folder / "model.safetensors"))
    assert not any("lora" in n or "so8t" in n for n in names)  # a plain Phi-3 state dict

    # The framework's model, unmerged: LoRA wrappers and adapter hooks as in training.
    state = locate(str(trained["dir"]), "final", trained["store"])
    rebuilt = rebuild(state)
    assert hasattr(rebuilt.model, "peft_config") and rebuilt.adapters
    fmt = chat.ChatFormat.from_tokenizer(rebuilt.tokenizer)
    prompts = val_prompts(state.cfg)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    result = tmp_path / "outside.pt"
    script = [sys.executable, "-c", OUTSIDE, str(folder), str(tmp_path / "prompts.json")]
    ran = subprocess.run([*script, str(result)], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    theirs = torch.load(result)
    worst = 0.0
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            text = fmt.prompt_text(prompt)
            ids = rebuilt.tokenizer(text, add_special_tokens=False, return_tensors="pt")[
                "input_ids"
            ]
            ours = rebuilt.model(input_ids=ids, output_hidden_states=True)
            worst = max(worst, (ours.logits[0] - theirs["logits"][i]).abs().max().item())
            greedy = rebuilt.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
            assert greedy[0].tolist() == theirs["greedy"][i], prompt
            probs = torch.softmax(rebuilt.head(ours.hidden_states[-1][:, -1]), -1)[0]
            label, confidence = theirs["labels"][i]
            assert label == data.FOUR_CLASS_LABELS[int(probs.argmax())]
            assert confidence == pytest.approx(float(probs.max()), abs=1e-5)
    assert worst <= 1e-5, f"max |Δlogit| {worst}"


def test_logged_registered_and_the_alias_follows_the_metric(trained):
    name = "so8t-tiny"
    final = export(trained, f"export.source={trained['run_id']}", f"export.register={name}")
    assert final.returncode == 0, final.stderr[-3000:]
    assert "version 1 (alias moved to it)" in final.stdout
    # the best checkpoint (highest eval/loss: best_mode=max) has a worse eval/loss (min)
    best = export(
        trained,
        f"export.source={trained['run_id']}",
        "export.checkpoint=best",
        f"export.register={name}",
        "export.metric=eval/loss",
        "export.mode=min",
    )
    assert best.returncode == 0, best.stderr[-3000:]
    assert "version 2 (alias not moved)" in best.stdout
    client = MlflowClient(trained["store"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1" and champion.run_id == trained["run_id"]
    v1, v2 = (client.get_model_version(name, v) for v in ("1", "2"))
    assert float(v1.tags["so8t.metric.eval/loss"]) < float(v2.tags["so8t.metric.eval/loss"])
    assert (trained["dir"] / "export" / "best-step00000006" / "so8t_export.json").is_file()

    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(trained["store"])
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    got = model.predict(pd.DataFrame({"prompt": ["Hello?"]}), params={"max_new_tokens": 4})
    assert list(got.columns) == ["answer", "safety_label", "safety_confidence"]
    assert got["safety_label"][0] in data.FOUR_CLASS_LABELS
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["prompt"]


def test_export_by_run_id_on_another_machine_downloads_from_mlflow(trained, tmp_path):
    here = tmp_path / "here"
    assert export(trained, f"export.source={trained['dir']}", f"export.out={here}").returncode == 0
    moved = trained["tmp"] / "run-elsewhere"
    shutil.move(trained["dir"], moved)  # the session folder is not on this machine
    try:
        there = tmp_path / "there"
        out = export(
            trained,
            f"export.source={trained['run_id']}",
            f"export.out={there}",
            "export.log_model=false",
        )
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        shutil.move(moved, trained["dir"])
    a, b = load_file(here / "model.safetensors"), load_file(there / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_source_is_one_clear_line(trained, tmp_path):
    out = export(trained, "export.source=no-such-run-or-folder")
    assert out.returncode == 2
    assert "export.source=no-such-run-or-folder" in out.stderr and "Traceback" not in out.stderr
