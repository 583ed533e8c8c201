"""The config tree: every experiment composes; bad keys and values fail early and clearly."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from so8t_exp.config import ConfigError, validate
from so8t_exp.paths import config_dir
from tests.conftest import EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(compose_cfg, experiment):
    cfg = compose_cfg(f"+experiment={experiment}")
    validate(cfg)
    assert cfg.trainer.max_steps >= 1 and cfg.model.source._target_


def test_required_keys_and_defaults(compose_cfg):
    cfg = compose_cfg()
    assert cfg.seed == 42
    assert cfg.checkpoint.interval_seconds == 180
    assert cfg.checkpoint.every_n_steps == 0
    assert cfg.checkpoint.keep == 5
    assert cfg.tracking.experiment and "tracking" in cfg and "eval_every_n_steps" in cfg.trainer


def test_run_dirs_have_no_colon():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    run_dir, sweep_dir = cfg.hydra.run.dir, cfg.hydra.sweep.dir
    for d in (run_dir, sweep_dir):
        assert ":" not in Path(d).relative_to(Path(d).anchor).as_posix(), d
        assert Path(d).is_absolute()


def test_borea_experiment_uses_pretrained_source(compose_cfg):
    cfg = compose_cfg("+experiment=borea")
    assert cfg.model.source._target_.endswith("Pretrained")
    assert "Borea" in cfg.model.source.name_or_path
    assert cfg.model.lora.enabled


@pytest.mark.parametrize(
    ("override", "key"),
    [("trainer.max_step=3", "max_step"), ("checkpoint.kep=3", "kep")],
)
def test_misspelled_override_names_the_key(compose_cfg, override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(override)
    assert key in str(err.value) + str(err.value.__cause__)


def test_ill_typed_value_names_the_key(compose_cfg):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_cfg("trainer.max_steps=many")
    text = str(err.value) + str(err.value.__cause__)
    assert "max_steps" in text


def test_misspelled_key_in_a_group_file_names_key_and_file(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    bad = conf / "checkpoint" / "default.yaml"
    bad.write_text(bad.read_text() + "intervall_seconds: 60\n")
    with (
        initialize_config_dir(config_dir=str(conf), version_base="1.3"),
        pytest.raises((ConfigCompositionException, ConfigKeyError)) as err,
    ):
        compose("train")
    text = str(err.value) + str(err.value.__cause__)
    assert "intervall_seconds" in text and "checkpoint/default" in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.files=[/no/such/file.jsonl]", "data.files[0]"),
        ("data.files=[]", "data.files"),
        ("data.on_bad_record=ignore", "data.on_bad_record"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.scheduler.name=step", "trainer.scheduler.name"),
        ("checkpoint.keep=1", "checkpoint.keep"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.eval_every_n_steps=0", "trainer.eval_every_n_steps"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
        ("trainer.device=tpu", "trainer.device"),
        ("+trainer.optimizer.lrr=0.1", "trainer.optimizer.lrr"),
        ("+model.source.hidden_sise=64", "model.source.hidden_sise"),
        ("model.source._target_=no.such.Thing", "model.source._target_"),
        ("model.so8t.layers=middle", "model.so8t.layers"),
        ("trainer.max_bad_steps=0", "trainer.max_bad_steps"),
        ("checkpoint.best_metric=train/loss", "checkpoint.best_metric"),
        ("checkpoint.best_mode=lowest", "checkpoint.best_mode"),
        ("model.safety_head.loss_weight=-1", "model.safety_head"),
        ("model.safety_head.dropout=1.0", "model.safety_head"),
        # `+` lifts the schema's struct flag: a key the schema lacks must still be refused
        ("+trainer.max_step=10", "trainer.max_step: not a key of the schema"),
        ("+foo=1", "foo: not a key of the schema"),
        ("++checkpoint.intervall_seconds=1", "checkpoint.intervall_seconds"),
        # negative intervals would silently switch crash protection off
        ("checkpoint.interval_seconds=-1", "checkpoint.interval_seconds"),
        ("checkpoint.every_n_steps=-5", "checkpoint.every_n_steps"),
        ("checkpoint.mirror_timeout_seconds=-1", "checkpoint.mirror_timeout_seconds"),
        ("session.lock_wait_seconds=-1", "session.lock_wait_seconds"),
        ("tracking.startup_timeout_seconds=-1", "tracking.startup_timeout_seconds"),
        ("tracking.flush_interval_seconds=0", "tracking.flush_interval_seconds"),
        ("tracking.system_stats_interval_seconds=-10", "tracking.system_stats_interval"),
        ("progress.interval_seconds=0", "progress.interval_seconds"),
        ("session.heartbeat_seconds=-30", "session.heartbeat_seconds"),
    ],
)
def test_validate_names_the_key(compose_cfg, override, message):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_plus_still_adds_groups_and_open_dict_keys(compose_cfg):
    cfg = compose_cfg(
        "+experiment=smoke",
        "+tracking.tags.team=nlp",
        "+notify.notifiers.second={_target_: so8t_exp.notify.ConsoleNotifier}",
        "checkpoint.interval_seconds=0",  # 0: off, as documented
    )
    validate(cfg)
    assert cfg.tracking.tags.team == "nlp" and "second" in cfg.notify.notifiers


def test_hint_for_a_plus_key_names_the_nearest_one(compose_cfg):
    with pytest.raises(ConfigError, match=r"did you mean trainer\.max_steps\?"):
        validate(compose_cfg("+trainer.max_step=10"))


def test_a_folder_as_data_file_is_told_as_a_folder(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.files\[0\]: .* is a folder"):
        validate(compose_cfg(f"data.files=[{tmp_path}]"))


def test_cfg_job_from_an_unrelated_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "so8t_exp.train", "--cfg", "job", "--resolve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "max_steps:" in out.stdout and "so8t_sample.jsonl" in out.stdout


@pytest.mark.slow
def test_config_tree_found_from_a_built_wheel(tmp_path):
    """The wheel carries conf/ as so8t_exp/conf; run from an unpacked wheel, not the checkout."""
    root = config_dir().parent
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-w",
            str(tmp_path / "dist"),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("so8t_exp-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "so8t_exp" / "conf" / "train.yaml").is_file()
    assert (site / "so8t_exp" / "assets" / "tokenizer" / "tokenizer.json").is_file()
    code = "from so8t_exp.paths import config_dir; print(config_dir())"
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    where = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert Path(where.stdout.strip()) == site / "so8t_exp" / "conf", where.stderr
    job = subprocess.run(
        [sys.executable, "-m", "so8t_exp.train", "--cfg", "job", "--resolve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stderr
    assert str(site / "so8t_exp" / "assets") in job.stdout


def test_a_head_metric_as_best_needs_the_head(compose_cfg):
    cfg = compose_cfg("model.safety_head.enabled=false", "checkpoint.best_metric=eval/macro_f1")
    with pytest.raises(ConfigError, match="model.safety_head.enabled=false"):
        validate(cfg)
    validate(compose_cfg("model.safety_head.enabled=false"))  # eval/loss needs no head
    validate(compose_cfg("checkpoint.best_metric=eval/refuse_recall", "checkpoint.best_mode=max"))
