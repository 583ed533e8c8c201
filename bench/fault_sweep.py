"""Scenario ``sweep`` of ``bench/faults.py`` (issue 13): an Optuna sweep killed anywhere must
continue exactly, by the same command or by ``python -m so8t_exp.resume``.

A reference sweep (``hparams_search=eval_loss``, its seed, one trial at a time, never
interrupted) and the same sweep in another home, slowed by ``SO8T_FAULT_STEP_SECONDS`` and
killed at moments drawn from the suite's seeded RNG: during the start-up before a trial
trains, during a trial's training (after one of its checkpoints), right after a trial
finished (its tell, tagging, the next ask). Mostly SIGKILL of the whole process group
(sweeper and in-process trainer, or launcher and the sweep it runs); sometimes SIGTERM.
Continuations alternate between the sweep's own command and the resume launcher, sometimes
two launchers at once. The last continuation runs the sweep to its end; then a launcher must
find nothing to resume.

``sweep_kills`` signals delivered to a live sweep or launcher; ``sweep_trials_expected``
``n_trials``; ``sweep_trials_finished`` COMPLETE or PRUNED trials in the study (a FAIL is a
problem); ``sweep_trials_duplicated`` trial numbers with more than one MLflow child run, a
trial whose run was not trained in its own job folder or whose folder changed run, plus job
folders beyond ``n_trials``; ``sweep_trials_orphaned`` trials left RUNNING or WAITING, child
runs not FINISHED or without ``optuna.trial.number``; ``sweep_params_equal`` 1 if the trials'
parameters, in order, equal the reference's (values and intermediate values must match too,
else a problem).
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from types import ModuleType

from so8t_exp.paths import sqlite_uri

STUDY = "faults"
STEPS, EVAL_EVERY, CKPT_EVERY = 6, 3, 2
SLOW = {"SO8T_FAULT_STEP_SECONDS": "0.3"}  # steps slow enough to be killed in
# start-up kills: at the start, or just after the sweep's "sweep run" / "trial N" log line
STARTUP_MARKS = (None, "[HYDRA] sweep run ", "[HYDRA] trial ")
EXTRA = ("training", "training", "between", "startup")  # moments beyond one of each


def _faults(suite) -> ModuleType:
    """``bench/faults.py`` itself (``__main__`` when run as a script): its helpers, not copies."""
    return sys.modules[type(suite).__module__]


class Sweep:
    """One sweep's home: its command, its study, its job folders and MLflow runs."""

    def __init__(
        self, suite, name: str, n_trials: int, extra: tuple[str, ...] = (), **env: str
    ) -> None:
        self.suite, self.f, self.n_trials, self.extra = suite, _faults(suite), n_trials, extra
        self.home = suite.folder(name)
        self.store = sqlite_uri(self.home / "mlruns" / "mlflow.db")
        self.dir = self.home / "multirun" / "sweeps" / STUDY
        self.env = suite.env(self.home, **env)

    def start(self, kind: str) -> list:
        if kind == "command":
            cmd = [
                sys.executable,
                "-m",
                "so8t_exp.train",
                "-m",
                "hparams_search=eval_loss",
                f"tracking.uri={self.store}",
                "+experiment=smoke",
                "trainer.progress_bar=false",
                f"trainer.max_steps={STEPS}",
                f"trainer.eval_every_n_steps={EVAL_EVERY}",
                f"checkpoint.every_n_steps={CKPT_EVERY}",
                "tracking.log_models=[]",
                f"hydra.sweeper.study_name={STUDY}",
                f"hydra.sweeper.n_trials={self.n_trials}",
                *self.extra,
            ]
            return [self.suite.start(cmd, self.home, "sweep", self.env)]
        ov = "resume.max_attempts=1000"  # kills without progress are not a crash loop here
        n = 2 if kind == "launchers" else 1
        return [self.suite.start_resume(self.home, self.store, ov, env=self.env) for _ in range(n)]

    # ---- the record (read between legs: nothing else then writes the stores)
    def trials(self) -> list:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        path = self.home / "mlruns" / "optuna.db"
        if not path.is_file():  # (load_study would create it)
            return []
        try:
            study = optuna.load_study(study_name=STUDY, storage=sqlite_uri(path))
        except KeyError:  # killed before the study was created
            return []
        return sorted(study.get_trials(), key=lambda t: t.number)

    def runs(self) -> tuple[list, list]:
        """(parent runs, child runs) in the sweep's MLflow store."""
        if not (self.home / "mlruns" / "mlflow.db").is_file():
            return [], []
        client = self.suite.client(self.store)
        exp = client.get_experiment_by_name("so8t")
        found = client.search_runs([exp.experiment_id], max_results=5000) if exp else []
        parents = [r for r in found if r.data.tags.get("so8t.sweep.parent") == "true"]
        return parents, [r for r in found if r not in parents]

    def finished(self) -> bool:
        """n_trials finished, none RUNNING, and the parent run FINISHED."""
        states = [t.state.name for t in self.trials()]
        done = sum(s in ("COMPLETE", "PRUNED", "FAIL") for s in states)
        parents, _ = self.runs()
        closed = bool(parents) and all(p.info.status == "FINISHED" for p in parents)
        return done >= self.n_trials and "RUNNING" not in states and closed

    def folders(self) -> dict[int, dict]:
        """Job folder number -> its session_info.json (``{}`` while it has none)."""
        if not self.dir.is_dir():
            return {}
        found = {int(p.name): p for p in self.dir.iterdir() if p.name.isdigit() and p.is_dir()}
        return {n: self.f.session_info(p) for n, p in sorted(found.items())}

    def where(self) -> str:
        parts = [
            f"{n}:{i.get('status', 'no session')}@{i.get('current_step', 0)}"
            for n, i in self.folders().items()
        ]
        return "trial folders " + (", ".join(parts) if parts else "none yet")


def sweep_plan(rng: random.Random, kills: int, n_trials: int):
    """(moment, signal) per kill, then the continuation of each leg after the first (the
    sweep's command, one launcher, or two launchers at once)."""
    first = rng.choice(["startup", "training"])
    must = [m for m in ("training", "between", "startup") if m != first][: kills - 1]
    body = must + [rng.choice(EXTRA) for _ in range(kills - 1 - len(must))]
    rng.shuffle(body)
    moments = [first, *body]
    for i in [i for i, m in enumerate(moments) if m == "between"][n_trials - 1 :]:
        moments[i] = "training"  # a kill right after a trial needs a trial still to come
    sigs = [signal.SIGTERM if rng.random() < 0.25 else signal.SIGKILL for _ in moments]
    training = [i for i, m in enumerate(moments) if m == "training"]
    if kills >= 5 and len(training) > 1 and all(sigs[i] == signal.SIGKILL for i in training):
        sigs[rng.choice(training[1:])] = signal.SIGTERM  # the full run: one mid-training
    if training and all(sigs[i] == signal.SIGTERM for i in training):
        sigs[training[0]] = signal.SIGKILL  # at least one SIGKILL mid-training
    kinds = ["command", "launcher"]
    rng.shuffle(kinds)
    conts = [kinds[i % 2] for i in range(kills + 12)]
    launcher_legs = [i for i, k in enumerate(conts[:kills]) if k == "launcher"]
    for i in launcher_legs:
        conts[i] = "launchers" if rng.random() < 0.5 else "launcher"
    if launcher_legs and "launchers" not in conts[:kills]:
        conts[rng.choice(launcher_legs)] = "launchers"
    return list(zip(moments, sigs, strict=True)), conts


class Legs:
    """Runs the killed sweep leg by leg: start, wait for the moment, signal, wait."""

    def __init__(self, suite, sw: Sweep, rng: random.Random) -> None:
        self.suite, self.sw, self.f, self.rng = suite, sw, sw.f, rng
        self.kills, self.logs, self.legs = 0, [], 0
        self.runs_of: dict[int, set[str]] = {}  # job folder -> the run ids it ever held
        self.killed_in: dict[int, int] = {}  # folder killed mid-training -> its resumes then

    def alive(self, procs) -> bool:
        return any(p.poll() is None for p in procs)

    def wait(self, pred, procs, timeout: float, what: str, quiet: bool = False) -> bool:
        """True once ``pred()``; False if every process exited first; on timeout, Stuck
        (``quiet``: True, a plain sleep while a process lives)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            if not self.alive(procs):
                return pred()
            time.sleep(0.01)
        if quiet:
            return True
        raise self.f.Stuck(f"timed out after {timeout:.0f}s waiting for {what}")

    def moment(self, moment: str, procs, kind: str) -> tuple[bool, str]:
        """Wait for ``moment`` in this leg; (reached with a process alive, what it was)."""
        snap = self.sw.folders()
        texts = lambda: "".join(self.f.log_text(p) for p in procs)  # noqa: E731
        if moment == "startup":
            # its own start-up (imports, Hydra), once the parent run is opened (the study
            # and sweep_command.json come next), or once a trial is asked or re-attached
            # (its job not started yet)
            mark = self.rng.choice(STARTUP_MARKS)
            delay = self.rng.uniform(0.0, 0.3) if mark else self.rng.uniform(0.3, 2.5)
            what = f"{delay:.2f}s after {repr(mark) if mark else 'the start'}"
            if self.wait(lambda: not mark or mark in texts(), procs, 120, what):
                self.wait(lambda: False, procs, delay, what, quiet=True)
        elif moment == "training":
            delay = self.rng.uniform(0.0, 0.5)

            def trained() -> bool:
                now = self.sw.folders()
                return any(
                    i.get("status") != "completed"
                    and i.get("current_step", 0) > snap.get(n, {}).get("current_step", 0)
                    for n, i in now.items()
                )

            what = f"a trial's next checkpoint, then {delay:.2f}s"
            if self.wait(trained, procs, 300, what):
                time.sleep(delay)
        else:
            delay = self.rng.uniform(0.0, 0.4)

            def ended() -> bool:
                now = self.sw.folders()
                return any(
                    i.get("status") == "completed" and snap.get(n, {}).get("status") != "completed"
                    for n, i in now.items()
                )

            what = f"a trial's session completed, then {delay:.2f}s"
            if self.wait(ended, procs, 300, what):
                time.sleep(delay)
        return self.alive(procs), what

    def note_killed(self) -> None:
        """Folders training now (a checkpoint made): their resumes before the kill."""
        for n, i in self.sw.folders().items():
            if i.get("status") != "completed" and i.get("current_step", 0) > 0:
                self.killed_in.setdefault(n, int(i.get("resumes", 0)))

    def signal(self, procs, sig: int) -> list[int]:
        self.note_killed()
        for p in procs:
            if p.poll() is None:
                self.f.kill_group(p.pid, sig)
        codes = [self.f.wait_exit(p, 180, "signalled sweep or launcher") for p in procs]
        for p in procs:
            if not self.f.wait_group_gone(p.pid, 60):
                raise self.f.Stuck(f"process group {p.pid} alive 60s after {sig.name}")
        return codes

    def note_folders(self) -> None:
        for n, info in self.sw.folders().items():
            if info.get("session_id"):
                self.runs_of.setdefault(n, set()).add(info["session_id"])

    def refused(self, procs) -> bool:
        """A launcher leg ended, the sweep unfinished, and no launcher continued it. A sweep
        killed before it recorded anything is not the launcher's to continue (a problem only
        once its parent run and ``sweep_command.json`` exist)."""
        texts = [self.f.log_text(p) for p in procs]
        if any("continuing sweep" in t for t in texts):
            return False
        parents, _ = self.sw.runs()
        marked = [p for p in parents if p.data.tags.get("so8t.sweep.study")]
        recorded = (self.sw.dir / "sweep_command.json").is_file()
        why = f"parent runs {len(parents)} ({len(marked)} marked as a study's), "
        why += f"sweep_command.json {'present' if recorded else 'absent'}"
        if marked and recorded:
            self.suite.problem(
                "the resume launcher did not continue a dead, unfinished sweep",
                f"{why}; {self.sw.where()}",
                [p.log for p in procs],
            )
        elif parents:
            self.suite.problem(
                "a sweep killed in its first start-up is not continued by the launcher",
                f"{why}: the parent run exists (RUNNING, dead) but the launcher ignores it; "
                "only the sweep's own command continues it",
                [p.log for p in procs],
                minor=True,
            )
        else:
            self.suite.say(f"launcher: nothing recorded yet ({why}); the command continues")
        return True

    def run(self, plan, conts) -> None:
        pending, conts, fallback = list(plan), list(conts), False
        while self.legs < len(plan) + 8:
            if self.legs and self.sw.finished():
                break
            kind = "command" if self.legs == 0 or fallback else conts.pop(0)
            fallback = False
            procs = self.sw.start(kind)
            self.legs += 1
            self.logs += [p.log for p in procs]
            label = f"leg {self.legs} ({kind}{' x2' if len(procs) > 1 else ''})"
            if pending:
                (moment, sig), landed = pending[0], False
                reached, what = self.moment(moment, procs, kind)
                if reached:
                    where = self.sw.where()
                    codes = self.signal(procs, sig)
                    self.kills += 1
                    pending.pop(0)
                    landed = True
                    self.suite.say(
                        f"{label}: kill {self.kills}: {sig.name} at {moment} [{what}]; "
                        f"{where}; exit {codes}"
                    )
            else:
                landed = False
            if not landed:
                codes = [self.f.wait_exit(p, 600, "sweep or launcher") for p in procs]
                done = self.sw.finished()
                self.suite.say(
                    f"{label}: ran to its end, exit {codes}, sweep "
                    f"{'finished' if done else 'NOT finished'}; {self.sw.where()}"
                )
                if kind != "command" and not done:
                    fallback = self.refused(procs)
                elif not done:
                    self.suite.problem(
                        f"the sweep's command exited {codes[0]} with the sweep unfinished",
                        self.sw.where(),
                        [procs[0].log],
                    )
                if len(procs) > 1:
                    self.check_once(procs)
                if pending and not fallback and done:
                    self.suite.say(f"sweep finished; {len(pending)} planned kill(s) not made")
            self.note_folders()
        if not self.sw.finished():
            self.suite.problem(f"sweep unfinished after {self.legs} legs", self.sw.where())

    def check_once(self, procs) -> None:
        """Two launchers at once: one sweeper may get past the sweep's lock."""
        texts = [self.f.log_text(p) for p in procs]
        opened = sum("[HYDRA] sweep run " in t for t in texts)
        self.suite.say(
            f"two launchers: {sum('continuing sweep' in t for t in texts)} started the sweep's "
            f"command, {opened} got past its lock"
        )
        if opened > 1:
            self.suite.problem(
                "two launchers at once both continued the sweep", logs=[p.log for p in procs]
            )


class Tally:
    """The sweep's record at its end: the study, the job folders and the MLflow runs, with
    what is duplicated (``duplicated``) or left unfinished (``orphaned``)."""

    def __init__(self, sw: Sweep, legs: Legs) -> None:
        self.trials = trials = sw.trials()
        self.states = states = {t.number: t.state.name for t in trials}
        self.finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        self.folders = folders = sw.folders()
        self.parents, children = sw.runs()
        self.by_trial = by_trial = {}
        orphaned = {f"trial {n} {s}" for n, s in states.items() if s in ("RUNNING", "WAITING")}
        for c in children:
            number = c.data.tags.get("optuna.trial.number")
            if c.info.status != "FINISHED":
                orphaned.add(f"run {c.info.run_id} {c.info.status}")
            if number is None:
                orphaned.add(f"run {c.info.run_id} without optuna.trial.number")
            else:
                by_trial.setdefault(int(number), []).append(c)
        duplicated = {f"trial {n}: {len(rs)} runs" for n, rs in by_trial.items() if len(rs) > 1}
        duplicated |= {f"folder {n}" for n in folders if n >= sw.n_trials or n not in states}
        for n, rs in by_trial.items():
            own = str((sw.dir / str(n)).resolve())
            if any(r.data.tags.get("so8t.session_dir") != own for r in rs):
                duplicated.add(f"trial {n}: a run trained outside {own}")
            held = folders.get(n, {}).get("session_id")
            if held not in {r.info.run_id for r in rs}:
                duplicated.add(f"trial {n}: folder holds run {held}")
        for n, ids in legs.runs_of.items():
            if len(ids) > 1:
                duplicated.add(f"folder {n} held runs {sorted(ids)}")
        for t in trials:
            if t.user_attrs.get("job_dir") not in (None, (sw.dir / str(t.number)).as_posix()):
                duplicated.add(f"trial {t.number}: job_dir {t.user_attrs['job_dir']}")
        self.duplicated, self.orphaned = duplicated, orphaned


def check_record(suite, sw: Sweep, legs: Legs, tally: Tally) -> None:
    """PROBLEMs of any sweep's end: trials not all finished, duplicated or orphaned, the
    parent run, each trial's train/loss, the trials killed mid-training resumed."""
    f, states, folders = sw.f, tally.states, tally.folders
    suite.say(f"trials {[f'{n}:{s}' for n, s in states.items()]}; {sw.where()}")
    if len(tally.finished) != sw.n_trials or len(tally.trials) != sw.n_trials:
        suite.problem(
            f"{len(tally.finished)} finished trials of {len(tally.trials)} "
            f"(n_trials={sw.n_trials})",
            str(states),
            legs.logs[-3:],
        )
    if tally.duplicated:
        suite.problem(
            "trials duplicated or job folders overwritten", "; ".join(sorted(tally.duplicated))
        )
    if tally.orphaned:
        suite.problem("trials or child runs left unfinished", "; ".join(sorted(tally.orphaned)))
    parents = tally.parents
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        suite.problem(
            f"{len(parents)} parent run(s), status {[p.info.status for p in parents]} "
            "(expected one, FINISHED)"
        )
    client = suite.client(sw.store)
    for n, rs in sorted(tally.by_trial.items()):
        for r in rs:
            seen = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
            dup = len(seen) - len(set(seen))
            complete = states.get(n) == "COMPLETE"
            missing = sorted(set(range(1, STEPS + 1)) - set(seen)) if complete else []
            if dup or missing:
                suite.problem(
                    f"trial {n}: train/loss {dup} duplicate point(s), missing steps {missing}"
                )
    for n, before in legs.killed_in.items():
        info = folders.get(n, {})
        if int(info.get("resumes", 0)) <= before:
            suite.problem(
                f"trial {n} was killed mid-training but its session was not resumed",
                f"resumes {info.get('resumes')} (was {before} at the kill); {sw.where()}",
            )
    if any(f.session_info(sw.dir / str(n)).get("status") != "completed" for n in states):
        suite.problem("a trial's session is not completed", sw.where())


def check_end(suite, sw: Sweep, ref: list, legs: Legs) -> dict:
    """The keys, from the study, the job folders and the MLflow runs; PROBLEMs for the rest."""
    tally = Tally(sw, legs)
    trials = tally.trials
    equal = [t.params for t in trials] == [t.params for t in ref]
    out = {
        "sweep_kills": legs.kills,
        "sweep_trials_expected": sw.n_trials,
        "sweep_trials_finished": len(tally.finished),
        "sweep_trials_duplicated": len(tally.duplicated),
        "sweep_trials_orphaned": len(tally.orphaned),
        "sweep_params_equal": int(equal),
    }
    check_record(suite, sw, legs, tally)
    if not equal:
        suite.problem(
            "trial parameters differ from the uninterrupted sweep's",
            f"killed: {[t.params for t in trials]}\nreference: {[t.params for t in ref]}",
        )
    elif [(t.value, _intermediate(t)) for t in trials] != [
        (t.value, _intermediate(t)) for t in ref
    ]:
        suite.problem(
            "trial values differ from the uninterrupted sweep's (same parameters)",
            f"killed: {[(t.value, _intermediate(t)) for t in trials]}\n"
            f"reference: {[(t.value, _intermediate(t)) for t in ref]}",
        )
    return out


def check_after_end(suite, sw: Sweep) -> None:
    """A launcher after the sweep's end must find nothing to do, and leave the study as is."""
    f = sw.f
    proc = sw.start("launcher")[0]
    rc = f.wait_exit(proc, 300, "launcher after the end")
    text = f.log_text(proc)
    after = [t.state.name for t in sw.trials()]
    suite.say(f"launcher after the end: exit {rc}, {'nothing to resume' in text}, {after}")
    if rc != 0 or "nothing to resume" not in text or len(after) != sw.n_trials:
        suite.problem("a launcher after the sweep's end did something", logs=[proc.log])


def _intermediate(trial) -> dict:
    return json.loads(json.dumps(trial.intermediate_values))


def scenario_sweep(suite) -> dict:
    """An Optuna sweep killed anywhere: its command or the launcher continues it exactly."""
    f = _faults(suite)
    rng = suite.rng("sweep")
    n_trials, kills = (3, 3) if suite.args.quick else (4, 6)
    plan, conts = sweep_plan(rng, kills, n_trials)
    suite.say(f"{n_trials} trials x {STEPS} steps; kills {[(m, s.name) for m, s in plan]}")
    suite.say(f"continuations after the first leg: {conts[:kills]}, then {conts[kills:]}")
    ref = Sweep(suite, "sweep_reference", n_trials)
    proc = ref.start("command")[0]
    rc = f.wait_exit(proc, 600, "reference sweep")
    ref_trials = ref.trials()
    suite.say(f"reference sweep: exit {rc}, {[t.state.name for t in ref_trials]}")
    if rc != 0 or not ref.finished():
        suite.problem(f"the reference sweep failed (exit {rc})", ref.where(), [proc.log])
    sw = Sweep(suite, "sweep", n_trials, **SLOW)
    legs = Legs(suite, sw, rng)
    legs.run(plan, conts)
    out = check_end(suite, sw, ref_trials, legs)
    check_after_end(suite, sw)
    return out
