"""Fault-injection suite: kill, corrupt, race, cut the tracking server, fill the disk and
crash-loop real ``so8t_exp`` trainers, and check that every run still ends as it should.

    python bench/faults.py                  # full suite (~10 min on 2 CPU cores)
    python bench/faults.py --quick          # 4 kills, 2 corruptions, 2 trials, ... (~5 min)
    python bench/faults.py --seed 7         # other random choices (moments, corruptions, ...)
    python bench/faults.py --kills 20       # scenario 1 with 20 kills
    python bench/faults.py --only kills,crash_loop --keep

Linux only (process groups, /proc; scenario 5 mounts a tmpfs as root and falls back to
RLIMIT_FSIZE otherwise). Every trainer (``python -m so8t_exp.train``), resume launcher
(``python -m so8t_exp.resume``) and ``mlflow server`` is a subprocess in its own process
group with a private MLflow store under a temporary folder; all are killed when a scenario
ends, however it ends. The folder is deleted at the end unless a problem was found or
``--keep`` is given (its path is printed). Children run with ``OMP_NUM_THREADS=1``
(``--threads``): on a small shared machine that is faster and steadier, and every run of the
suite uses the same setting, so bitwise comparisons stay fair.

Every run uses ``+experiment=smoke`` with ``trainer.max_steps=N`` (36 by default),
``checkpoint.every_n_steps=4``; a baseline run of the same config, never interrupted, is the
reference. The suite prints a short log per scenario, each product failure as a ``PROBLEM``
block (scenario, seed, what was lost or wrong, the relevant log lines), and ENDS with one JSON
line of counts:

1. kills: SIGKILL at random moments (after a random checkpoint, inside a checkpoint write
   slowed by ``SO8T_FAULT_CHECKPOINT_PAUSE``, during the launcher's start-up, while the run
   closes, after its final checkpoint), either the whole launcher process group (a power cut)
   or only the trainer; each time restarted through the resume launcher until finished
   (``resume.max_attempts=1000``: kills without progress are not a crash loop here; after a
   launcher refuses the dead run, later ones get ``resume.claim_grace_seconds=0``).
   ``kills`` SIGKILLs delivered to a live trainer or launcher; ``runs`` processes started for
   the run (the first trainer plus every launcher); ``completed`` 1 if the run ended FINISHED;
   ``bitwise_equal`` 1 if the final-step checkpoint's weights and optimizer tensors equal the
   baseline's bit for bit; ``duplicate_metric_steps`` extra ``train/loss`` points for a step
   already logged; ``missing_metric_steps`` steps 1..N with no ``train/loss`` point.
2. corruption: SIGTERM (emergency checkpoint), then the newest checkpoint is corrupted
   (truncate a file, flip bytes, delete the manifest, delete a tensor file, garbage manifest;
   each at least once in the full run), then the run is continued by the launcher.
   ``corruptions`` checkpoints corrupted; ``recovered_from_previous`` of those, how many times
   the next leg skipped the corrupted one and continued from the previous valid checkpoint
   (the run must also end bitwise equal to the baseline; a difference is a PROBLEM).
3. concurrent: several launchers started at once on one dead run, repeated.
   ``concurrent_trials`` trials; ``resumed_exactly_once`` trials in which exactly one launcher
   printed ``launching:`` and exactly one new ``so8t.resume.claim.*`` param appeared.
4. outage: training against a real ``mlflow server`` (sqlite backend, proxied artifacts) that
   is stopped (SIGTERM or SIGKILL of its process group) mid-run and restarted on the same port.
   ``outage_runs`` runs; ``training_survived`` runs with trainer exit 0 and the run FINISHED;
   ``metric_points_lost`` expected ``train/loss`` steps minus those in the store at the end.
5. disk_full: the session folder's file system fills up during a checkpoint write (a 64 MiB
   tmpfs filled but 0, 32, 512 or 1792 KiB, or RLIMIT_FSIZE without root), the trainer runs to
   its end or is stopped by SIGTERM after the failed save, then space comes back and the
   launcher continues (the MLflow store stays on the normal disk). Three runs; one in --quick.
   ``disk_full_runs`` runs; ``earlier_checkpoints_intact`` runs in which every checkpoint that
   was valid before the disk filled still verifies and no broken checkpoint folder appeared;
   ``resumable_afterwards`` runs that the launcher then brought to FINISHED with a final
   checkpoint.
6. crash_loop: ``SO8T_FAULT_FAIL_AT_STEP`` makes the run fail at the same step every time;
   launchers with ``resume.max_attempts=K`` are started until the run is tagged given up.
   ``given_up_after_attempts`` resumes made before ``so8t.given_up`` (should equal K).

7. half_claim: a launcher dies (``SO8T_FAULT_DIE_AFTER_CLAIM``) right after writing its claim
   param, before its tags; later launchers must still resume the run, once.
   ``half_claims`` 1 if the launcher died with its claim written; ``finished_after_half_claim``
   1 if exactly one later launcher resumed it and the run FINISHED with every step once.
8. stall: host A trains against a real ``mlflow server`` that is frozen (SIGSTOP) for twice
   ``resume.stale_after_seconds`` while launchers of host B (``SO8T_HOST_ID``) watch it, before,
   during and after the stall. ``stall_runs`` runs; ``finished_once_by_one_trainer`` 1 if the
   run FINISHED with every step once and exactly one trainer (A, or B's after fencing A) ended it.
9. sweep (``bench/fault_sweep.py``): an Optuna sweep killed at random moments, continued by
   its command or the launcher (sometimes two at once) until it ends; compared with an
   uninterrupted one. ``sweep_kills``, ``sweep_trials_expected``, ``sweep_trials_finished``,
   ``sweep_trials_duplicated``, ``sweep_trials_orphaned``, ``sweep_params_equal``.
10. sweep_parallel (``bench/fault_psweep.py``): the same sweep with two trials at once
   (``hydra.sweeper.n_jobs=2``, each trial a child process), killed while both train and when
   one has finished and the next starts: SIGKILL of the sweeper only (its trials must stop by
   themselves), SIGKILL or SIGTERM of the process group; continued alternately by its command
   and the launcher. ``psweep_kills``, ``psweep_trials_expected``, ``psweep_trials_finished``,
   ``psweep_trials_duplicated``, ``psweep_trials_orphaned``, ``psweep_orphan_trainers``
   (trainer processes alive 30 s after their sweeper was killed: must be 0).

``problems`` counts the PROBLEM blocks printed above the JSON line; ``seconds`` is wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import fault_psweep
import fault_sweep
import psutil
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from so8t_exp.checkpoint.format import candidates, parse_name, verify
from so8t_exp.paths import sqlite_uri

EVERY = 4  # checkpoint.every_n_steps
EVAL = 12  # trainer.eval_every_n_steps
OUTAGE_STEPS = 60  # a longer run for scenario 4, so the server goes down mid-training
CORRUPTIONS = ("truncate", "flip", "delete_manifest", "delete_tensor", "garbage_manifest")
SCENARIOS = (
    "kills",
    "corruption",
    "concurrent",
    "outage",
    "disk_full",
    "crash_loop",
    "half_claim",
    "stall",
    "sweep",
    "sweep_parallel",
)
_TMP_WRITE = re.compile(r"^\.tmp-(rolling|best|emergency|final)-step\d+-\d+$")
_INTERESTING = re.compile(
    r"WARNING|ERROR|Error|Traceback|skipping|continuing from|nothing to resume|being resumed|"
    r"launching:|give_up|given_up|failed|resum|alive|lost|could not",
)


KEYS = {
    "kills": "kills runs completed bitwise_equal duplicate_metric_steps missing_metric_steps",
    "corruption": "corruptions recovered_from_previous",
    "concurrent": "concurrent_trials resumed_exactly_once",
    "outage": "outage_runs training_survived metric_points_lost",
    "disk_full": "disk_full_runs earlier_checkpoints_intact resumable_afterwards",
    "crash_loop": "given_up_after_attempts",
    "half_claim": "half_claims finished_after_half_claim",
    "stall": "stall_runs finished_once_by_one_trainer",
    "sweep": "sweep_kills sweep_trials_expected sweep_trials_finished sweep_trials_duplicated "
    "sweep_trials_orphaned sweep_params_equal",
    "sweep_parallel": "psweep_kills psweep_trials_expected psweep_trials_finished "
    "psweep_trials_duplicated psweep_trials_orphaned psweep_orphan_trainers",
}


class Stuck(Exception):
    """A wait timed out: the product hung, or the suite's expectation was wrong."""


# -- the suite's context: folders, children, problems --------------------------------------
class Suite:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work, self.seed = args, work, args.seed
        self.steps = max(36, -(-4 * (args.kills + 1) // EVAL) * EVAL)
        self.procs: list[subprocess.Popen] = []
        self.problems: list[dict] = []
        self.baseline: dict | None = None
        self.scenario = "setup"
        self.t0 = time.monotonic()
        self._clients: dict[str, MlflowClient] = {}
        self._counter = 0

    # ---- output
    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] [{self.scenario}] {msg}", flush=True)

    def problem(
        self, what: str, details: str = "", logs: list[Path] = (), minor: bool = False
    ) -> None:
        """Report a product failure (once per scenario and text; repeats get one line)."""
        if any(p["what"] == what and p["scenario"] == self.scenario for p in self.problems):
            print(f"PROBLEM (again) [{self.scenario}]: {what}", flush=True)
            return
        lines = []
        for path in logs:
            lines += [f"{path.name}: {ln}" for ln in interesting_lines(path)]
        entry = {"scenario": self.scenario, "seed": self.seed, "what": what, "details": details}
        self.problems.append(entry)
        label = "PROBLEM (minor)" if minor else "PROBLEM"
        print(f"{label} [{self.scenario}] seed={self.seed}: {what}", flush=True)
        for text in ([details] if details else []) + lines:
            for ln in text.splitlines():
                print(f"    | {ln}", flush=True)

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}:{name}")

    # ---- children
    def env(self, home: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SO8T_FAULT_")}
        env.pop("MLFLOW_TRACKING_URI", None)
        threads = str(self.args.threads)
        env.update(
            SO8T_EXP_HOME=str(home),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            **extra,
        )
        return env

    def start(self, cmd: list[str], home: Path, tag: str, env: dict | None = None):
        """Start ``cmd`` in its own process group, output to ``home/logs/NN-tag.log``."""
        self._counter += 1
        log = home / "logs" / f"{self._counter:03d}-{tag}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                cmd,
                cwd=home,
                env=env or self.env(home),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_train(self, home: Path, store: str, run_dir: Path, *ov: str, env=None):
        cmd = [sys.executable, "-m", "so8t_exp.train", f"tracking.uri={store}"]
        cmd += [f"hydra.run.dir={run_dir}", *ov]
        return self.start(cmd, home, "train", env)

    def start_resume(self, home: Path, store: str, *ov: str, env=None):
        cmd = [sys.executable, "-m", "so8t_exp.resume", f"tracking.uri={store}", *ov]
        return self.start(cmd, home, "resume", env)

    def kill_all(self) -> None:
        for proc in self.procs:
            kill_group(proc.pid)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()

    def overrides(self, steps: int | None = None, keep: int = 3) -> tuple[str, ...]:
        return (
            "+experiment=smoke",
            f"trainer.max_steps={steps or self.steps}",
            f"trainer.eval_every_n_steps={EVAL}",
            f"checkpoint.every_n_steps={EVERY}",
            f"checkpoint.keep={keep}",
            "trainer.progress_bar=false",
        )

    def client(self, uri: str) -> MlflowClient:
        if uri not in self._clients:
            self._clients[uri] = MlflowClient(uri)
        return self._clients[uri]

    def only_run(self, uri: str):
        client = self.client(uri)
        exp = client.get_experiment_by_name("so8t")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if len(runs) != 1:
            raise Stuck(f"expected one run in {uri}, found {len(runs)}")
        return client, runs[0]

    def killed_run(self, home: Path, store: str, run_dir: Path) -> tuple[MlflowClient, str]:
        """A run SIGKILLed once it has checkpointed step 8: its store's client and run id."""
        proc = self.start_train(home, store, run_dir, *self.overrides())
        wait_for(lambda: current_step(run_dir) >= 2 * EVERY, 300, "step 8", proc)
        kill_group(proc.pid)
        proc.wait(30)
        client, run = self.only_run(store)
        return client, run.info.run_id

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# -- small helpers --------------------------------------------------------------------------
def interesting_lines(path: Path, limit: int = 14) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln[:220] for ln in text if _INTERESTING.search(ln)][-limit:]


def log_text(proc) -> str:
    try:
        return proc.log.read_text(errors="replace")
    except OSError:
        return ""


def session_info(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "session_info.json").read_text())
    except (OSError, ValueError):
        return {}


def current_step(run_dir: Path) -> int:
    return int(session_info(run_dir).get("current_step", 0) or 0)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, proc=None, poll=0.02) -> bool:
    """True once ``pred()`` holds; False if ``proc`` exited first; Stuck on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(poll)
    raise Stuck(f"timed out after {timeout:.0f}s waiting for {what}")


def sleep_unless_exited(seconds: float, proc) -> bool:
    """Sleep; False if ``proc`` exited meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return proc.poll() is None


def wait_exit(proc, timeout: float, what: str = "process") -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        raise Stuck(f"{what} (pid {proc.pid}) still running after {timeout:.0f}s") from None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            found.append(int(entry))
    return found


def kill_group(pgid: int, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
    """Signal a whole process group; for SIGKILL, wait until none of it is left."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return
    if sig != signal.SIGKILL:
        return
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def trainer_pid(proc) -> int | None:
    """The process training in ``proc``: a ``so8t_exp.train`` (itself, or the child of a
    launcher run with ``resume.in_process=false``), else the ``so8t_exp.resume`` launcher,
    which trains in its own process by default."""
    try:
        parent = psutil.Process(proc.pid)
        family = [p for p in [parent, *parent.children(recursive=True)] if p.status() != "zombie"]
        for entry in ("so8t_exp.train", "so8t_exp.resume"):
            for p in family:
                if entry in " ".join(p.cmdline()):
                    return p.pid
    except psutil.Error:
        pass
    return None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Named checkpoint folders, newest first (by step, then final > emergency > rolling)."""
    return [folder for _s, _k, folder in candidates(run_dir / "checkpoints")]


def tmp_writes(run_dir: Path) -> set[str]:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return set()
    return {p.name for p in ckpt.iterdir() if _TMP_WRITE.match(p.name)}


def step_of(folder: Path) -> int:
    return parse_name(folder.name)[1]


def claims(client: MlflowClient, run_id: str) -> set[str]:
    params = client.get_run(run_id).data.params
    return {k for k in params if k.startswith("so8t.resume.claim.")}


def final_tensors(run_dir: Path, steps: int) -> tuple[dict | None, str]:
    folder = run_dir / "checkpoints" / f"final-step{steps:08d}"
    if not folder.is_dir():
        return None, f"{folder.name} missing"
    problem = verify(folder)
    if problem:
        return None, f"{folder.name}: {problem}"
    return {g: load_file(folder / f"{g}.safetensors") for g in ("weights", "optimizer")}, ""


def bitwise_diff(suite: Suite, run_dir: Path, steps: int) -> list[str]:
    """What differs from the baseline's final checkpoint (empty: bit for bit equal)."""
    if suite.baseline is None:
        return ["no baseline"]
    ours, why = final_tensors(run_dir, steps)
    if ours is None:
        return [why]
    diffs = []
    for group, ref in suite.baseline["tensors"].items():
        if ours[group].keys() != ref.keys():
            diffs.append(f"{group}: tensor names differ")
            continue
        diffs += [f"{group}/{k}" for k, t in ref.items() if not torch.equal(ours[group][k], t)]
    return diffs


def loss_points(client: MlflowClient, run_id: str) -> list:
    return client.get_metric_history(run_id, "train/loss")


def metric_check(suite: Suite, client, run_id: str, steps: int, compare: bool = True):
    """(duplicate points, missing steps, steps whose value differs from the baseline)."""
    points = loss_points(client, run_id)
    seen = Counter(m.step for m in points)
    duplicates = sum(n - 1 for n in seen.values())
    missing = sorted(set(range(1, steps + 1)) - set(seen))
    ref = suite.baseline["loss"] if compare and suite.baseline else {}
    wrong = sorted({m.step for m in points if m.step in ref and m.value != ref[m.step]})
    return duplicates, missing, wrong


def report_run_end(suite: Suite, client, run_dir: Path, run_id: str, logs: list[Path]):
    """Check bitwise equality and the metric history; returns (equal, duplicates, missing)."""
    diffs = bitwise_diff(suite, run_dir, suite.steps)
    if diffs:
        suite.problem("final checkpoint differs from the uninterrupted baseline", ", ".join(diffs))
    dup, missing, wrong = metric_check(suite, client, run_id, suite.steps)
    if dup or missing or wrong:
        suite.problem(
            "train/loss history differs from the baseline's",
            f"duplicate points: {dup}; missing steps: {missing}; other values at: {wrong}",
            logs,
        )
    suite.say(
        f"final checkpoint {'bitwise equal' if not diffs else 'DIFFERS'}; train/loss: "
        f"{dup} duplicate, {len(missing)} missing, {len(wrong)} different"
    )
    return not diffs, dup, len(missing)


def newest_rolling(names: set[str]) -> str:
    rolling = [n for n in names if n.startswith("rolling-")]
    return max(rolling, key=lambda n: parse_name(n)[1], default="none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- baseline --------------------------------------------------------------------------------
def make_baseline(suite: Suite) -> None:
    """An uninterrupted run of the suite's config: the reference for bitwise comparisons."""
    home = suite.folder("baseline")
    store = sqlite_uri(home / "mlflow.db")
    proc = suite.start_train(home, store, home / "run", *suite.overrides())
    rc = wait_exit(proc, 600, "baseline trainer")
    if rc != 0:
        suite.problem(f"baseline run failed with exit code {rc}", logs=[proc.log])
        return
    client, run = suite.only_run(store)
    tensors, why = final_tensors(home / "run", suite.steps)
    if tensors is None:
        suite.problem(f"baseline final checkpoint unusable: {why}")
        return
    loss = {m.step: m.value for m in loss_points(client, run.info.run_id)}
    suite.baseline = {"tensors": tensors, "loss": loss}
    suite.say(f"{suite.steps} steps, {len(loss)} train/loss points, final checkpoint loaded")


# -- 1. SIGKILL at random moments -----------------------------------------------------------
def kill_plan(rng: random.Random, n: int) -> list[str]:
    """Moments to kill at: the first run is killed after a checkpoint or inside a write
    (it has no launcher); then each of step/write/startup at least once when there is room;
    the last kill (n >= 3) hits the run while it closes (after its final checkpoint)."""
    if n <= 0:
        return []
    plan = [rng.choice(["step", "write"])]
    middle = n - 1 - (n >= 3)
    must = [m for m in ("write", "startup", "step") if m != plan[0]][:middle]
    extra = [rng.choice(["step", "write", "startup"]) for _ in range(middle - len(must))]
    body = must + extra
    rng.shuffle(body)
    return plan + body + (["finishing"] if n >= 3 else [])


def scenario_kills(suite: Suite) -> dict:
    """SIGKILL at random moments; restart through the resume launcher until finished."""
    rng = suite.rng("kills")
    home = suite.folder("kills")
    store, run_dir = sqlite_uri(home / "mlflow.db"), home / "run"
    plan = kill_plan(rng, suite.args.kills)
    suite.say(f"plan: {plan}")
    out = dict.fromkeys(KEYS["kills"].split(), 0)
    logs: list[Path] = []
    stalled = False  # a launcher refused a dead run: later launchers use claim_grace 0
    launcher_ov = ["resume.max_attempts=1000"]  # scenario 6 tests the crash-loop guard

    def launcher(env=None):
        ov = launcher_ov + (["resume.claim_grace_seconds=0"] if stalled else [])
        return suite.start_resume(home, store, *ov, env=env)

    pending, i = list(plan), -1
    while pending:
        mode, i = pending[0], i + 1
        pause = round(rng.uniform(0.3, 1.0), 2) if mode == "write" else 0.0
        how = "power-cut" if i == 0 or rng.random() < 0.6 else "trainer-only"
        delay = rng.uniform(0.0, 0.5) if mode == "step" else rng.uniform(0.3, 9.0)
        env = suite.env(home, SO8T_FAULT_CHECKPOINT_PAUSE=str(pause)) if pause else None
        before_step, before_tmp = current_step(run_dir), tmp_writes(run_dir)
        if i == 0:
            proc = suite.start_train(home, store, run_dir, *suite.overrides(), env=env)
        else:
            proc = launcher(env)
        out["runs"] += 1
        logs.append(proc.log)
        if mode == "step":
            left = len(pending)
            span = max(1, (suite.steps - EVERY - before_step) // max(1, left))
            target = min(before_step + rng.randint(1, span), suite.steps - EVERY)
            what = f"checkpoint step >= {target}, then {delay:.2f}s"
            alive = wait_for(lambda t=target: current_step(run_dir) >= t, 300, what, proc)
            alive = alive and sleep_unless_exited(delay, proc)
        elif mode == "write":
            what = f"a checkpoint write (pause {pause}s) in progress"
            alive = wait_for(lambda b=before_tmp: tmp_writes(run_dir) - b, 300, what, proc)
            delay = rng.uniform(0.0, pause * 0.9)
            alive = alive and sleep_unless_exited(delay, proc)
        elif mode == "startup":
            what = f"{delay:.2f}s after the launcher started"
            alive = sleep_unless_exited(delay, proc)
        else:  # finishing: the final checkpoint is on disk, the run is being closed
            delay = rng.uniform(0.0, 0.12)  # closing takes ~0.1 s on a local sqlite store
            final = run_dir / "checkpoints" / f"final-step{suite.steps:08d}"
            what = f"{final.name} on disk, then {delay:.2f}s (export, mirror, FINISHED)"
            alive = wait_for(final.is_dir, 300, what, proc, poll=0.005)
            alive = alive and sleep_unless_exited(delay, proc)
        if not alive or proc.poll() is not None:
            rc = wait_exit(proc, 300)
            text = log_text(proc)
            suite.say(f"run {i + 1} ({mode}) exited by itself before the kill: exit {rc}")
            _client, run = suite.only_run(store)
            if run.info.status == "FINISHED":
                break
            if "launching:" not in text and "nothing to resume" in text and not stalled:
                stalled = True  # retry this kill with resume.claim_grace_seconds=0
                suite.problem(
                    "the launcher refused to resume a dead, unfinished run",
                    f"run status {run.info.status}, no process alive. The previous launcher "
                    "was killed after it claimed the run and before its trainer set a "
                    "heartbeat, so the fresh claim (so8t.resume.claim_time newer than "
                    "so8t.heartbeat) makes every launcher skip the run for "
                    "resume.claim_grace_seconds (120 s) although nobody works on it: after a "
                    "power cut during the boot-time resume, the next boot's launcher does "
                    "nothing. Suggest: on the claimant's own host, ignore a claim whose "
                    "PID (so8t.resume.claim_by host:pid:nonce) is gone and whose session lock "
                    "is free. Later launchers here use resume.claim_grace_seconds=0.",
                    [proc.log],
                )
                continue
            pending.pop(0)
            continue
        if how == "trainer-only" and trainer_pid(proc) is None:
            how = "power-cut"  # the launcher has not started its trainer yet
        victim = trainer_pid(proc)
        if how == "power-cut":
            kill_group(proc.pid)
        else:
            os.kill(victim, signal.SIGKILL)
        rc = wait_exit(proc, 120, "killed process")
        wait_group_gone(proc.pid, 30)
        out["kills"] += 1
        pending.pop(0)
        folders = checkpoint_folders(run_dir)
        newest = f"{folders[0].name} ({verify(folders[0]) or 'valid'})" if folders else "none"
        suite.say(
            f"kill {out['kills']}: {mode} [{what}], {how}, exit {rc}; newest checkpoint {newest}"
        )
        # (an in-process launcher is the trainer: it died itself, nothing is left to report)
        if how == "trainer-only" and victim != proc.pid and rc != 128 + signal.SIGKILL:
            suite.problem(
                "launcher exit code for a SIGKILLed trainer is not 128+9",
                f"launcher exited {rc}; README: '128+N stopped by signal N' (Popen returns "
                f"-9 and sys.exit(-9) gives {256 - 9}). Suggest: exit 128+N for a trainer "
                "killed by signal N.",
                minor=True,
            )
    # run it to the end; a launcher that leaves the run unfinished is a problem
    for attempt in range(3):
        _client, run = suite.only_run(store)
        if run.info.status == "FINISHED":
            break
        proc = launcher()
        out["runs"] += 1
        logs.append(proc.log)
        rc = wait_exit(proc, 600, "final launcher")
        _client, run = suite.only_run(store)
        suite.say(f"launcher {attempt + 1} to finish: exit {rc}, run {run.info.status}")
        if run.info.status != "FINISHED":
            suite.problem(
                f"launcher exited {rc} but the run is {run.info.status}",
                f"session status: {session_info(run_dir).get('status')}",
                [proc.log],
            )
            stalled = True
    client, run = suite.only_run(store)
    out["completed"] = int(run.info.status == "FINISHED")
    if out["completed"]:
        equal, dup, missing = report_run_end(suite, client, run_dir, run.info.run_id, logs)
        out.update(bitwise_equal=int(equal), duplicate_metric_steps=dup)
        out["missing_metric_steps"] = missing
    else:
        dup, missing, _ = metric_check(suite, client, run.info.run_id, suite.steps)
        out.update(duplicate_metric_steps=dup, missing_metric_steps=len(missing))
    return out


# -- 2. corrupted newest checkpoint ---------------------------------------------------------
def corruption_plan(rng: random.Random, n: int) -> list[str]:
    kinds = list(CORRUPTIONS)
    rng.shuffle(kinds)
    if n <= len(kinds):
        return kinds[:n]
    return kinds + [rng.choice(CORRUPTIONS) for _ in range(n - len(kinds))]


def corrupt(folder: Path, kind: str, rng: random.Random) -> str:
    """Damage checkpoint ``folder``; returns what was done."""
    files = sorted(json.loads((folder / "manifest.json").read_text())["files"])
    if kind == "truncate":
        path = folder / rng.choice(files)
        size = path.stat().st_size
        new = rng.randrange(0, size)
        os.truncate(path, new)
        return f"truncated {path.name} from {size} to {new} bytes"
    if kind == "flip":
        path = folder / rng.choice(files)
        data = bytearray(path.read_bytes())
        spots = sorted(rng.randrange(len(data)) for _ in range(rng.randint(1, 8)))
        for i in spots:
            data[i] ^= rng.randint(1, 255)
        path.write_bytes(bytes(data))
        return f"flipped bytes at {spots} of {path.name}"
    if kind == "delete_manifest":
        (folder / "manifest.json").unlink()
        return "deleted manifest.json"
    if kind == "delete_tensor":
        name = rng.choice([f for f in files if f.endswith(".safetensors")])
        (folder / name).unlink()
        return f"deleted {name}"
    garbage = (
        rng.randbytes(rng.randint(1, 2000))
        if rng.random() < 0.5
        else (folder / "manifest.json").read_bytes()[: rng.randint(0, 200)]
    )
    (folder / "manifest.json").write_bytes(garbage)
    return f"replaced manifest.json by {len(garbage)} bytes of garbage"


def stop_leg(suite: Suite, proc, how: str) -> int:
    """SIGTERM the trainer, or SIGINT the whole group (Ctrl-C in a terminal); returns the
    trainer's (or launcher's) exit code once every process of the group is gone."""
    if how == "sigint-group":
        kill_group(proc.pid, signal.SIGINT)
    else:
        pid = trainer_pid(proc)
        if pid is None:
            raise Stuck("no trainer to stop")
        os.kill(pid, signal.SIGTERM)
    rc = wait_exit(proc, 120, "stopped leg")
    if not wait_group_gone(proc.pid, 120):
        raise Stuck(f"processes of group {proc.pid} still alive 120s after {how}")
    return rc


def scenario_corruption(suite: Suite) -> dict:
    """Interrupt, corrupt the newest checkpoint, continue; repeat; must end as the baseline."""
    rng = suite.rng("corruption")
    home = suite.folder("corruption")
    store, run_dir = sqlite_uri(home / "mlflow.db"), home / "run"
    plan = corruption_plan(rng, 2 if suite.args.quick else len(CORRUPTIONS))
    suite.say(f"plan: {plan}")
    out = dict(corruptions=0, recovered_from_previous=0)
    logs: list[Path] = []
    proc = suite.start_train(home, store, run_dir, *suite.overrides())
    logs.append(proc.log)
    last_corrupted = 2 * EVERY - 1  # first stop once two rolling checkpoints exist
    for i, kind in enumerate(plan):
        target = last_corrupted + 1
        what = f"checkpoint step >= {target}"
        if not wait_for(lambda t=target: current_step(run_dir) >= t, 300, what, proc):
            suite.say(f"run ended before corruption {i + 1}; stopping the plan")
            break
        sleep_unless_exited(rng.uniform(0.0, 0.3), proc)
        how = "sigterm-trainer" if i == 0 or rng.random() < 0.6 else "sigint-group"
        rc = stop_leg(suite, proc, how)
        folders = checkpoint_folders(run_dir)
        valid = [f for f in folders if verify(f) is None]
        if len(valid) < 2:
            suite.problem(f"after {how} fewer than two valid checkpoints: {folders}")
            break
        newest, expected = valid[0], valid[1]
        if how == "sigterm-trainer" and rc != 128 + signal.SIGTERM:
            suite.problem(f"trainer exit {rc} after SIGTERM (expected 143)", logs=[proc.log])
        client, run = suite.only_run(store)
        logged = max((m.step for m in loss_points(client, run.info.run_id)), default=0)
        if logged > step_of(newest):
            suite.problem(
                f"after {how}, train/loss was logged up to step {logged} but the newest valid "
                f"checkpoint is {newest.name}: the emergency checkpoint is missing",
                logs=[proc.log],
            )
        done = corrupt(newest, kind, rng)
        out["corruptions"] += 1
        last_corrupted = step_of(newest)
        suite.say(
            f"corruption {i + 1}: {how} (exit {rc}), {kind} on {newest.name}: {done}; "
            f"expect recovery from {expected.name}"
        )
        proc = suite.start_resume(home, store)
        logs.append(proc.log)
        wait_for(lambda p=proc: "continuing from step" in log_text(p), 300, "a restore", proc)
        text = log_text(proc)
        skipped = f"skipping checkpoint {newest}" in text
        cont = f"continuing from step {step_of(expected)} ({expected.name})" in text
        if skipped and cont:
            out["recovered_from_previous"] += 1
        else:
            suite.problem(
                f"{kind} of {newest.name} not recovered from {expected.name}",
                f"skipped corrupted: {skipped}; continued from the expected one: {cont}; {done}",
                [proc.log],
            )
    rc = wait_exit(proc, 600, "last leg")
    client, run = suite.only_run(store)
    suite.say(f"last leg exit {rc}, run {run.info.status}")
    if rc != 0 or run.info.status != "FINISHED":
        suite.problem(f"run did not finish: exit {rc}, status {run.info.status}", logs=[proc.log])
    else:
        report_run_end(suite, client, run_dir, run.info.run_id, logs)
    return out


# -- 3. launchers at once --------------------------------------------------------------------
def scenario_concurrent(suite: Suite) -> dict:
    """Several launchers at once on one dead run: exactly one must resume it, every time."""
    rng = suite.rng("concurrent")
    home = suite.folder("concurrent")
    store, run_dir = sqlite_uri(home / "mlflow.db"), home / "run"
    trials, n = (2, 3) if suite.args.quick else (4, 3)
    out = dict(concurrent_trials=0, resumed_exactly_once=0)
    client, run_id = suite.killed_run(home, store, run_dir)
    for t in range(trials):
        last = t == trials - 1
        before_claims, before_step = claims(client, run_id), current_step(run_dir)
        procs = []
        for _ in range(n):
            procs.append(suite.start_resume(home, store))
            time.sleep(rng.uniform(0.0, 0.3))

        def settled(ps=procs, s=before_step) -> bool:
            launched = [p for p in ps if "launching:" in log_text(p)]
            waiting = [p for p in ps if p.poll() is None and p not in launched]
            if waiting:
                return False
            return all(p.poll() is not None for p in ps) or current_step(run_dir) > s

        wait_for(settled, 300, "the launchers to settle")
        if last:
            for p in procs:
                wait_exit(p, 600, "launcher")
        else:
            for p in procs:
                kill_group(p.pid)
                p.wait(30)
        texts = [log_text(p) for p in procs]
        launching = sum("launching:" in x for x in texts)
        new_claims = sorted(claims(client, run_id) - before_claims)
        out["concurrent_trials"] += 1
        ok = launching == 1 and len(new_claims) == 1
        out["resumed_exactly_once"] += ok
        codes = [p.returncode for p in procs]
        suite.say(
            f"trial {t + 1}: {n} launchers, {launching} launched, new claims {new_claims}, "
            f"exit codes {codes}{'' if last else ' (winner killed for the next trial)'}"
        )
        if not ok:
            suite.problem(
                f"trial {t + 1}: {launching} launchers resumed the run, claims {new_claims}",
                logs=[p.log for p in procs],
            )
        if not last and client.get_run(run_id).info.status == "FINISHED":
            suite.say("the run finished before its winner was killed; no more trials")
            break
    _client, run = suite.only_run(store)
    dup, missing, _ = metric_check(suite, client, run_id, suite.steps)
    suite.say(f"run {run.info.status}; train/loss {dup} duplicate, {len(missing)} missing")
    if run.info.status != "FINISHED" or dup or missing:
        suite.problem(f"after the trials: run {run.info.status}, {dup} dup, missing {missing}")
    return out


# -- 4. tracking server outage ---------------------------------------------------------------
class Server:
    """``mlflow server`` on a sqlite store with proxied artifacts, restartable on its port."""

    def __init__(self, suite: Suite, home: Path) -> None:
        self.suite, self.home, self.port = suite, home, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 180) -> float:
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow), "server", "--backend-store-uri", sqlite_uri(self.home / "srv.db")]
        cmd += ["--artifacts-destination", str(self.home / "artifacts"), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]
        started = time.monotonic()
        for _ in range(3):  # the port may still be held for a moment after a kill
            self.proc = self.suite.start(cmd, self.home, "server")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                        if r.status == 200:
                            return time.monotonic() - started
                except OSError:
                    time.sleep(0.25)
            kill_group(self.proc.pid)
            time.sleep(2)
        raise Stuck(f"mlflow server did not come up on port {self.port}")

    def stop(self, sig: int) -> None:
        kill_group(self.proc.pid, sig)
        if not wait_group_gone(self.proc.pid, 30):
            kill_group(self.proc.pid)
        self.proc.wait(10)


def scenario_outage(suite: Suite) -> dict:
    """Stop the tracking server mid-run and bring it back: training must finish, no points lost."""
    rng = suite.rng("outage")
    out = dict(outage_runs=0, training_survived=0, metric_points_lost=0)
    durations = [rng.uniform(3, 10)] + ([] if suite.args.quick else [rng.uniform(25, 45)])
    for r, down_for in enumerate(durations):
        home = suite.folder(f"outage{r + 1}")
        server = Server(suite, home)
        suite.say(f"run {r + 1}: server up in {server.start():.1f}s at {server.uri}")
        run_dir = home / "run"
        ov = suite.overrides(OUTAGE_STEPS, keep=5)
        proc = suite.start_train(home, server.uri, run_dir, *ov)
        stop_at = rng.randint(2, 5) * EVERY
        reached = lambda d=run_dir, s=stop_at: current_step(d) >= s  # noqa: E731
        wait_for(reached, 300, f"step {stop_at}", proc)
        sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
        before = {f.name for f in checkpoint_folders(run_dir)}
        t_down = time.time()
        server.stop(sig)
        seen: set[str] = set()
        deadline = time.monotonic() + down_for
        while time.monotonic() < deadline:
            seen |= {f.name for f in checkpoint_folders(run_dir)}
            time.sleep(0.1)
        restart = server.start()
        t_up = time.time()
        suite.say(
            f"run {r + 1}: server {signal.Signals(sig).name} at checkpoint step {stop_at}, "
            f"down {t_up - t_down:.1f}s (restart {restart:.1f}s)"
        )
        rc = wait_exit(proc, 600, "trainer after the outage")
        out["outage_runs"] += 1
        client, run = suite.only_run(server.uri)
        points = loss_points(client, run.info.run_id)
        steps = {m.step for m in points}
        lost = len(set(range(1, OUTAGE_STEPS + 1)) - steps)
        dup = len(points) - len(steps)
        during = sorted(m.step for m in points if t_down * 1000 <= m.timestamp <= t_up * 1000)
        written = sorted(seen - before)
        out["metric_points_lost"] += lost
        survived = rc == 0 and run.info.status == "FINISHED"
        out["training_survived"] += survived
        suite.say(
            f"run {r + 1}: trainer exit {rc}, run {run.info.status}, train/loss lost {lost}, "
            f"dup {dup}; steps trained while down: {len(during)}, local checkpoints written "
            f"while down: {written}"
        )
        if not survived or lost or dup:
            suite.problem(
                f"outage: exit {rc}, run {run.info.status}, {lost} train/loss steps lost, "
                f"{dup} duplicates",
                logs=[proc.log],
            )
        local = {f.name for f in checkpoint_folders(run_dir)}
        remote = {
            a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "checkpoints")
        }
        newest = checkpoint_folders(run_dir)[:1]
        suite.say(f"run {r + 1}: checkpoints local {sorted(local)}, in MLflow {sorted(remote)}")
        if newest and newest[0].name not in remote:
            suite.problem(
                f"after the outage the newest checkpoint {newest[0].name} is not in MLflow",
                f"local {sorted(local)}; MLflow {sorted(remote)}: a run that loses its session "
                "folder would restart from an older checkpoint.",
                [proc.log],
            )
        if len(during) >= 2 * EVERY and not written:
            suite.problem(
                "no local checkpoint was written while the tracking server was down",
                f"{len(during)} steps (from {during[0]} to {during[-1]}) were trained during the "
                f"{t_up - t_down:.0f}s outage with checkpoint.every_n_steps={EVERY}, but no "
                "checkpoint folder appeared: the checkpoint worker is stuck uploading (MLflow "
                "retries each call for minutes) and rolling saves are postponed while it is "
                "busy, so a crash during an outage loses every step since it began. Suggest: "
                "upload from a separate thread/queue so local saves never wait for tracking.",
                [proc.log],
            )
        server.stop(signal.SIGTERM)
    return out


# -- 5. disk full during a save -------------------------------------------------------------
def mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave: int) -> int:
    """Fill the file system of ``path`` with ``path/filler`` but ``leave`` bytes."""
    st = os.statvfs(path)
    todo = max(0, st.f_bavail * st.f_frsize - leave)
    chunk = b"\0" * (1 << 20)
    written = 0
    try:
        with open(path / "filler", "wb") as fh:
            while written < todo:
                written += fh.write(chunk[: min(len(chunk), todo - written)])
    except OSError:
        pass
    return written


def scenario_disk_full(suite: Suite) -> dict:
    """The disk fills during a checkpoint write; earlier checkpoints must stay valid and the
    run must finish once there is space again."""
    rng = suite.rng("disk_full")
    out = dict(disk_full_runs=0, earlier_checkpoints_intact=0, resumable_afterwards=0)
    # (what the trainer does after the failed save, bytes left free): 1.75 MiB holds the
    # exported final_model (1.2 MB) but no checkpoint (3.3 MB); the others hold next to nothing.
    small = rng.choice([0, 32 << 10, 512 << 10])
    variants = [("run_to_end", 1792 << 10), ("run_to_end", small), ("stop_after_failure", small)]
    rng.shuffle(variants)
    for r, (variant, leave) in enumerate(variants[:1] if suite.args.quick else variants):
        home = suite.folder(f"disk_full{r + 1}")
        store = sqlite_uri(home / "mlflow.db")
        disk = home / "disk"
        tmpfs = mount_tmpfs(disk, 64)
        try:
            run_dir = disk / "run"
            # Slow writes (0.8 s pause after the first file), so the disk fills mid-write.
            env = suite.env(home, SO8T_FAULT_CHECKPOINT_PAUSE="0.8")
            proc = suite.start_train(home, store, run_dir, *suite.overrides(), env=env)
            nth = rng.randint(2, 4)
            seen: set[str] = set()

            def writing(n=nth, d=run_dir, seen=seen) -> bool:
                now = tmp_writes(d)
                seen |= now
                return bool(now) and len(seen) >= n

            if not wait_for(writing, 300, f"checkpoint write number {nth}", proc):
                raise Stuck("the trainer ended before the disk could be filled")
            intact_before = {f.name for f in checkpoint_folders(run_dir)}  # complete, by design
            writes = sorted(tmp_writes(run_dir))
            if tmpfs:
                filler = fill(disk, leave) >> 20
                how = f"tmpfs filled ({filler} MiB filler, {leave >> 10} KiB left)"
            else:
                limit = 1_600_000  # below optimizer.safetensors (2.2 MB), above weights
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
                how = f"RLIMIT_FSIZE={limit} set on the trainer (tmpfs not available)"
            suite.say(f"run {r + 1} ({variant}): {how} during {writes}; before: {intact_before}")
            if variant == "stop_after_failure":
                failed = lambda p=proc: "checkpoint_failed" in log_text(p)  # noqa: E731
                if wait_for(failed, 120, "a failed checkpoint", proc):
                    pid = trainer_pid(proc)
                    if pid:
                        os.kill(pid, signal.SIGTERM)
            rc = wait_exit(proc, 300, "trainer on a full disk")
            out["disk_full_runs"] += 1
            client, run = suite.only_run(store)
            info = session_info(run_dir)
            now = {f.name: verify(f) for f in checkpoint_folders(run_dir)}
            lost = sorted(n for n in intact_before if now.get(n, "gone") is not None)
            broken = sorted(n for n, why in now.items() if why and n not in intact_before)
            leftovers = sorted(tmp_writes(run_dir))
            failures = log_text(proc).count("checkpoint_failed")
            suite.say(
                f"run {r + 1}: trainer exit {rc}, run {run.info.status}, session "
                f"{info.get('status')}; {failures} failed saves; earlier checkpoints lost or "
                f"broken: {lost}; new broken folders: {broken}; leftover temp folders: "
                f"{leftovers}"
            )
            if not lost and not broken:
                out["earlier_checkpoints_intact"] += 1
            else:
                suite.problem(
                    f"disk full: earlier checkpoints lost/broken {lost}, broken folders {broken}",
                    logs=[proc.log],
                )
            if failures == 0:
                suite.problem("disk full: no checkpoint_failed notification", logs=[proc.log])
            no_final = f"final-step{suite.steps:08d}" not in now
            if run.info.status == "FINISHED" and no_final:
                suite.problem(
                    "disk full: run marked FINISHED (session "
                    f"'{info.get('status')}') although its final checkpoint was never written",
                    f"trainer exit {rc}; checkpoints now: {sorted(now)}; final_model/ exported: "
                    f"{(run_dir / 'final_model' / 'adapter_model.safetensors').is_file()}. The "
                    "failed final save is only notified (checkpoint_failed); _complete() goes on "
                    "to export, FINISHED and 'completed', so no launcher will ever resume the "
                    "run: its final optimizer/RNG state is gone and the run cannot be verified "
                    "or continued. Suggest: fail the run (exit 1, FAILED, no 'completed') when "
                    "the final save fails, so it is resumed once there is space.",
                    [proc.log],
                )
            if rc != 0 and run.info.status == "RUNNING":
                suite.problem(
                    f"disk full: trainer exited {rc} but its MLflow run is still RUNNING "
                    f"(session status '{info.get('status')}')",
                    "_stopped() writes session_info.json before tracker.finish(): on a full "
                    "disk session.save() raises ENOSPC, so the run is never set FAILED, the "
                    "metric buffer is not flushed and no 'failed' notification is sent. Left "
                    f"behind: {sorted(q.name for q in run_dir.glob('.*.tmp-*'))}. "
                    "Suggest: make each step of _stopped() best-effort (try/except + log), "
                    "and always reach tracker.finish() and notify().",
                    [proc.log],
                )
            if rc not in (0, 1, 128 + signal.SIGTERM):
                suite.problem(f"disk full: unexpected trainer exit {rc}", logs=[proc.log])
            if tmpfs:
                (disk / "filler").unlink()
            lifted = suite.start_resume(home, store)
            rc2 = wait_exit(lifted, 600, "launcher after the disk was freed")
            client, run = suite.only_run(store)
            final, _ = final_tensors(run_dir, suite.steps)
            ok = rc2 == 0 and run.info.status == "FINISHED" and final is not None
            out["resumable_afterwards"] += ok
            suite.say(f"run {r + 1}: space back; launcher exit {rc2}, run {run.info.status}")
            if ok:
                report_run_end(suite, client, run_dir, run.info.run_id, [proc.log, lifted.log])
            elif run.info.status == "FINISHED" and no_final:
                suite.say(f"run {r + 1}: not resumable (already FINISHED, see the problem above)")
            else:
                suite.problem(
                    f"disk full: not resumed to completion (launcher exit {rc2}, run "
                    f"{run.info.status}, final checkpoint {'present' if final else 'missing'})",
                    logs=[lifted.log],
                )
        finally:
            suite.kill_all()
            if tmpfs:
                unmount(disk)
    return out


# -- 6. crash loop ---------------------------------------------------------------------------
def scenario_crash_loop(suite: Suite) -> dict:
    """A run failing at the same step each time is given up after resume.max_attempts."""
    rng = suite.rng("crash_loop")
    home = suite.folder("crash_loop")
    store, run_dir = sqlite_uri(home / "mlflow.db"), home / "run"
    k = 2 if suite.args.quick else 3
    fail_at = rng.randint(EVERY + 2, 3 * EVERY)
    env = suite.env(home, SO8T_FAULT_FAIL_AT_STEP=str(fail_at))
    proc = suite.start_train(home, store, run_dir, *suite.overrides(), env=env)
    rc = wait_exit(proc, 300, "failing trainer")
    suite.say(f"SO8T_FAULT_FAIL_AT_STEP={fail_at}: first run exit {rc}")
    resumes, given_up, logs = 0, False, [proc.log]
    for _ in range(k + 3):
        proc = suite.start_resume(home, store, f"resume.max_attempts={k}", env=env)
        logs.append(proc.log)
        rc = wait_exit(proc, 300, "launcher")
        text = log_text(proc)
        client, run = suite.only_run(store)
        given_up = bool(run.data.tags.get("so8t.given_up"))
        resumes += "launching:" in text
        suite.say(f"launcher: exit {rc}, launched: {'launching:' in text}, given up: {given_up}")
        if given_up:
            if "given_up" not in text:
                suite.problem("given up without a given_up notification", logs=[proc.log])
            break
    if resumes != k or not given_up:
        suite.problem(
            f"crash loop: {resumes} resumes, given up: {given_up} (resume.max_attempts={k})",
            logs=logs[-2:],
        )
    return {"given_up_after_attempts": resumes}


# -- 7. a launcher dies between its claim and the rest ---------------------------------------
def scenario_half_claim(suite: Suite) -> dict:
    """A launcher killed right after its claim (before its tags): the next one still resumes."""
    home = suite.folder("half_claim")
    store, run_dir = sqlite_uri(home / "mlflow.db"), home / "run"
    out = dict(half_claims=0, finished_after_half_claim=0)
    client, run_id = suite.killed_run(home, store, run_dir)
    dying = suite.start_resume(home, store, env=suite.env(home, SO8T_FAULT_DIE_AFTER_CLAIM="1"))
    rc = wait_exit(dying, 300, "launcher dying after its claim")
    half = claims(client, run_id)
    out["half_claims"] = int(rc != 0 and len(half) == 2)
    suite.say(f"launcher died after its claim: exit {rc}, claims {sorted(half)}")
    launched = 0
    for _ in range(3):
        proc = suite.start_resume(home, store)
        wait_exit(proc, 600, "launcher")
        launched += "launching:" in log_text(proc)
        if client.get_run(run_id).info.status == "FINISHED":
            break
    _client, run = suite.only_run(store)
    dup, missing, _ = metric_check(suite, client, run_id, suite.steps)
    ok = run.info.status == "FINISHED" and launched == 1 and not dup and not missing
    out["finished_after_half_claim"] = int(ok)
    suite.say(
        f"then {launched} launcher(s) launched; run {run.info.status}, claims "
        f"{sorted(claims(client, run_id))}; train/loss {dup} dup, {len(missing)} missing"
    )
    if not ok:
        suite.problem(
            f"after a half-made claim: run {run.info.status}, {launched} launches, {dup} dup, "
            f"missing {missing}",
            logs=[dying.log, proc.log],
        )
    return out


# -- 8. the tracking server stalls past resume.stale_after_seconds -------------------------
def scenario_stall(suite: Suite) -> dict:
    """The server freezes (SIGSTOP) longer than stale_after_seconds while host A trains and
    host B's launchers watch: the run must end finished once, by one trainer."""
    home = suite.folder("stall")
    server = Server(suite, home)
    suite.say(f"server up in {server.start():.1f}s at {server.uri}")
    stale, steps = 8.0, OUTAGE_STEPS
    # One MLflow call may take at most ~3 s here; the lease is 3 heartbeats (1.5 s).
    bounded = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    env_a = suite.env(home, SO8T_HOST_ID="host-a", SO8T_FAULT_STEP_SECONDS="0.3", **bounded)
    ov = (*suite.overrides(steps, keep=5), "session.heartbeat_seconds=0.5")
    trainer = suite.start_train(home, server.uri, home / "run", *ov, env=env_a)
    wait_for(lambda: current_step(home / "run") >= 2 * EVERY, 300, "step 8", trainer)
    home_b = suite.folder("stall_host_b")
    env_b = suite.env(home_b, SO8T_HOST_ID="host-b", **bounded)
    watch = f"resume.stale_after_seconds={stale}"
    launchers = [suite.start_resume(home_b, server.uri, watch, env=env_b)]
    time.sleep(1.0)
    os.killpg(server.proc.pid, signal.SIGSTOP)
    stalled = 2 * stale
    suite.say(f"server stopped (SIGSTOP) for {stalled:.0f}s; resume.stale_after_seconds={stale}")
    time.sleep(stalled / 2)
    launchers.append(suite.start_resume(home_b, server.uri, watch, env=env_b))
    time.sleep(stalled / 2)
    os.killpg(server.proc.pid, signal.SIGCONT)
    launchers.append(suite.start_resume(home_b, server.uri, watch, env=env_b))
    rc = wait_exit(trainer, 900, "host A's trainer")
    codes = [wait_exit(p, 600, "host B's launcher") for p in launchers]
    launched = sum("launching:" in log_text(p) for p in launchers)
    client, run = suite.only_run(server.uri)
    run_id = run.info.run_id
    dup, missing, _ = metric_check(suite, client, run_id, steps, compare=False)
    fenced = "fenced: run" in log_text(trainer)
    trainers = (rc == 0) + launched
    suite.say(
        f"host A's trainer exit {rc}{' (fenced)' if fenced else ''}; host B's launchers exit "
        f"{codes}, {launched} launched; run {run.info.status}; claims "
        f"{sorted(claims(client, run_id))}; train/loss {dup} dup, {len(missing)} missing"
    )
    ok = run.info.status == "FINISHED" and trainers == 1 and not dup and not missing
    if not ok:
        suite.problem(
            f"stall: run {run.info.status}, {trainers} trainers finished it, {dup} dup, "
            f"missing {missing}",
            logs=[trainer.log, *(p.log for p in launchers)],
        )
    server.stop(signal.SIGTERM)
    return {"stall_runs": 1, "finished_once_by_one_trainer": int(ok)}


# -- main ------------------------------------------------------------------------------------
RUNNERS = {
    "kills": scenario_kills,
    "corruption": scenario_corruption,
    "concurrent": scenario_concurrent,
    "outage": scenario_outage,
    "disk_full": scenario_disk_full,
    "crash_loop": scenario_crash_loop,
    "half_claim": scenario_half_claim,
    "stall": scenario_stall,
    "sweep": fault_sweep.scenario_sweep,
    "sweep_parallel": fault_psweep.scenario_sweep_parallel,
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer kills, trials and runs")
    ap.add_argument("--seed", type=int, default=0, help="changes every random choice")
    ap.add_argument("--kills", type=int, default=None, help="scenario 1 kills (4 quick, 8)")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--workdir", default=None, help="parent of the work folder (default: tmp)")
    args = ap.parse_args(argv)
    if args.kills is None:
        args.kills = 4 if args.quick else 8
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="so8t-faults-", dir=args.workdir))
    suite = Suite(args, work)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    counts: dict[str, int] = {}
    suite.say(f"seed {args.seed}, {suite.steps} steps, work folder {work}")
    try:
        suite.scenario = "baseline"
        make_baseline(suite)
        for name in args.only:
            suite.scenario = name
            suite.say(RUNNERS[name].__doc__.splitlines()[0])
            result = dict.fromkeys(KEYS[name].split(), 0)
            try:
                result.update(RUNNERS[name](suite))
            except Stuck as err:
                suite.problem(f"stuck: {err}", logs=[p.log for p in suite.procs[-3:]])
            except Exception:
                suite.problem("scenario crashed (suite or product)", traceback.format_exc())
            finally:
                suite.kill_all()
            counts.update(result)
            suite.say(json.dumps(result))
    finally:
        suite.kill_all()
        keep = args.keep or bool(suite.problems)
        suite.scenario = "end"
        if keep:
            suite.say(f"{len(suite.problems)} problem(s); logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    counts["problems"] = len(suite.problems)
    counts["seconds"] = round(time.monotonic() - suite.t0)
    print(json.dumps(counts), flush=True)
    return 1 if suite.problems else 0


if __name__ == "__main__":
    sys.exit(main())
