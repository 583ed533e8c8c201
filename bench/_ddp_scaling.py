"""Benchmark 6: DDP scaling — two gloo ranks against one process on the same global batch.

Three real command lines train the tiny default model (``TinyPhi3`` + SO8T adapters, the
bundled sample set) for the same steps, seed and *global* batch of ``2 × B`` examples:

* ``solo``: ``python -m so8t_exp.train ... trainer.micro_batch_size=2B`` with one torch
  thread (``OMP_NUM_THREADS=1``): one worker on one core, the baseline of the efficiency;
* ``ddp``: ``python -m torch.distributed.run --standalone --nproc-per-node=2 -m
  so8t_exp.train ... trainer.micro_batch_size=B`` (as ``tests/test_distributed.py`` starts
  it), each rank with one torch thread: two workers, one core each. ``BatchPlan`` gives rank
  ``r`` the ``r``-th half of the very examples ``solo`` takes in one micro-batch, so both
  compute the same step (their ``train/loss`` agree to float rounding: checked, and
  reported as ``max_loss_diff``);
* ``solo_all``: as ``solo`` with two torch threads (``OMP_NUM_THREADS=2``): the one process
  given every core of a 2-core machine, to read the DDP figure against what a user of this
  machine would otherwise run.

Steps/s come from the MLflow timestamps of rank 0's ``train/loss`` (stamped when a step's
metrics reach the tracker, right after the step), over the window from the end of step
``FIRST`` to the end of the last step: process start-up (imports, MLflow run creation,
joining the process group, model build) and the first steps (allocator and DDP bucket
warm-up) are outside it, and so are the final evaluation and save (evaluation only at the
last step, no rolling saves within the window: ``checkpoint.every_n_steps=0`` and the
default 180 s interval). Rounds run the three in rotated order; each ratio is the median over
rounds of the ratio within a round.

    speedup = steps/s(ddp) / steps/s(solo)           (same global batch, same examples)
    ddp_scaling_efficiency = speedup / 2             (1.0: linear scaling over 2 workers)
    ddp_speedup_vs_all_cores = steps/s(ddp) / steps/s(solo_all)

Read both on a 2-core machine: the efficiency says how much of a second worker DDP turns
into throughput (gradient all-reduce over gloo, the ranks' lock-step, the rank-0 tracking
threads sharing a core); the second says whether two ranks beat one process with two
intra-op threads here at all. Each micro-batch is padded to its own longest example, so a
rank's half-batch can carry slightly less padding than the whole one (``tokens_per_step``
in the JSON shows the padded token counts of both, and ``efficiency_per_padded_token`` the
efficiency counted in padded tokens computed per second instead of steps).

    python bench/_ddp_scaling.py [--quick]     # this benchmark alone; ends with one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    OtherLoad,
    compose_train,
    log,
    median,
    new_store,
    quiet,
    rotated_rounds,
    steps_per_second,
    subprocess_env,
)
from mlflow.tracking import MlflowClient

from so8t_exp.launcher import train_command

KINDS = ("solo", "ddp", "solo_all")
THREADS = {"solo": 1, "ddp": 1, "solo_all": 2}  # torch intra-op threads per process
FIRST = 2  # the window starts at the end of this step (1-based)
# (steps per run, at most this many rounds, none started that would end past budget s)
QUICK = (30, 2, 110.0)  # ~95 s on 2 cores
FULL = (60, 4, 360.0)


@dataclass
class Results:
    per_rank: int  # B: micro-batch of each DDP rank; the single process takes 2B
    steps: int
    sps: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    wall: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    # CPU the rest of the machine used during each run, in cores (read the figures by it)
    load: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    rounds: list[dict[str, float]] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)  # first round's, per kind

    def paired(self, kind: str, base: str) -> float:
        return median([r[kind] / r[base] for r in self.rounds if kind in r and base in r])

    def max_loss_diff(self) -> float:
        a, b = self.losses.get("ddp", []), self.losses.get("solo", [])
        return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=float("nan"))


def overrides(store: str, run_dir: Path, steps: int, micro_batch: int) -> list[str]:
    return [
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "trainer.progress_bar=false",
        f"trainer.max_steps={steps}",
        f"trainer.micro_batch_size={micro_batch}",
        f"trainer.eval_every_n_steps={steps}",  # evaluation at the end only
        "trainer.eval_max_batches=1",
        "tracking.log_models=[]",  # no model export after the last step
        "notify=none",
    ]


def command(kind: str, store: str, run_dir: Path, steps: int, per_rank: int) -> list[str]:
    """What the launcher would run: under torchrun with two ranks, or one process."""
    if kind == "ddp":
        return train_command(overrides(store, run_dir, steps, per_rank), world_size=2)
    return train_command(overrides(store, run_dir, steps, 2 * per_rank))


def one(kind: str, root: Path, store: str, i: int, steps: int, per_rank: int):
    """One training run: (steps/s over the window, process wall seconds, train/loss, CPU
    cores the rest of the machine used meanwhile)."""
    run_dir = root / f"{kind}-{i}"
    env = {**subprocess_env(root), "OMP_NUM_THREADS": str(THREADS[kind])}
    env.pop("MKL_NUM_THREADS", None)
    out = root / f"{kind}-{i}.log"
    started = time.monotonic()
    with OtherLoad() as load, out.open("w") as fh:
        proc = subprocess.run(
            command(kind, store, run_dir, steps, per_rank),
            cwd=root,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    wall, other = time.monotonic() - started, load.cores
    if proc.returncode != 0:
        tail = "\n".join(out.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{kind} run exited {proc.returncode}:\n{tail}")
    run_id = json.loads((run_dir / "session_info.json").read_text())["session_id"]
    points = sorted(MlflowClient(store).get_metric_history(run_id, "train/loss"), key=_step)
    if len(points) != steps:
        raise RuntimeError(f"{kind}: expected {steps} train/loss points, got {len(points)}")
    ends = [m.timestamp / 1000 for m in points]
    return steps_per_second(ends[FIRST - 1 :]), wall, [m.value for m in points], other


def _step(m) -> int:
    return m.step


def padded_tokens(steps: int, per_rank: int) -> dict[str, float]:
    """Mean tokens per step including padding: one micro-batch of 2B (``solo``) vs two of
    B, each padded to its own longest example (``ddp``, both ranks together)."""
    from transformers import AutoTokenizer

    from so8t_exp import build, data

    cfg = compose_train("sqlite://", f"trainer.micro_batch_size={2 * per_rank}")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.source.tokenizer_path)
    examples, _ = build.encode_records(cfg, tokenizer, data.load_dataset(cfg.data).train)
    pad = tokenizer.pad_token_id

    def mean(plans: list[data.BatchPlan]) -> float:
        sizes = [
            sum(b["input_ids"].numel() for p in plans for b in p.micro_batches(s))
            for s in range(steps)
        ]
        return sum(sizes) / len(sizes)

    solo = data.BatchPlan(examples, 2 * per_rank, 1, cfg.seed, pad)
    ranks = [data.BatchPlan(examples, per_rank, 1, cfg.seed, pad, r, 2) for r in (0, 1)]
    return {"solo": mean([solo]), "ddp": mean(ranks)}


def run(
    root: Path, store: str, steps: int, rounds: int, budget_s: float, per_rank: int = 4
) -> Results:
    """Up to ``rounds`` rounds of the three runs, order rotated each round; a round is only
    started if the previous one's duration still fits in ``budget_s``."""
    res = Results(per_rank, steps)
    for i, order in rotated_rounds(KINDS, rounds, budget_s):
        res.rounds.append({})
        for kind in order:
            sps, wall, losses, other = one(kind, root, store, i, steps, per_rank)
            res.sps[kind].append(sps)
            res.wall[kind].append(wall)
            res.load[kind].append(other)
            res.rounds[-1][kind] = sps
            res.losses.setdefault(kind, losses)
            log(
                f"  ddp round {i + 1}/{rounds} {kind:8}: {sps:6.2f} steps/s "
                f"({wall:.1f} s wall, other load {other:.2f} cores)"
            )
    return res


def summary(res: Results) -> dict:
    """The figures of ``bench/run.py``'s ``ddp`` entry."""
    speedup = res.paired("ddp", "solo")
    out = {
        "steps": res.steps,
        "first_step_in_window": FIRST,
        "rounds": len(res.rounds),
        "per_rank_micro_batch": res.per_rank,
        "global_batch": 2 * res.per_rank,
        "threads": dict(THREADS),
        "steps_per_sec": {k: median(v) for k, v in res.sps.items()},
        "wall_seconds": {k: median(v) for k, v in res.wall.items()},
        "other_load_cores": {k: max(v, default=float("nan")) for k, v in res.load.items()},
        "speedup": speedup,
        "ddp_scaling_efficiency": speedup / 2,
        "ddp_speedup_vs_all_cores": res.paired("ddp", "solo_all"),
        "per_round": res.rounds,
        "max_loss_diff": res.max_loss_diff(),
    }
    tokens = out["tokens_per_step"] = padded_tokens(res.steps, res.per_rank)
    # (per padded token computed: DDP's half-batches carry less padding)
    out["efficiency_per_padded_token"] = (
        out["ddp_scaling_efficiency"] * tokens["ddp"] / tokens["solo"]
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bench/run.py --quick's plan")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--per-rank", type=int, default=4, help="micro-batch of each rank (B)")
    args = ap.parse_args()
    quiet()
    steps, rounds, budget_s = QUICK if args.quick else FULL
    steps, rounds = args.steps or steps, args.rounds or rounds
    root = Path(tempfile.mkdtemp(prefix="so8t-ddp-"))
    started = time.monotonic()
    try:
        res = run(root, new_store(root), steps, rounds, budget_s, args.per_rank)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = summary(res)
    out["runtime_seconds"] = time.monotonic() - started
    out["cpu_cores"] = os.cpu_count()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
