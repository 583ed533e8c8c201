"""so8t_exp benchmark suite: every figure is a ratio against a baseline measured in the same run.

    python bench/run.py            # about 15-20 minutes on 2 CPU cores
    python bench/run.py --quick    # about 5 minutes: fewer steps and rounds, smaller stall model
    python bench/run.py --threads 0   # overhead loops with torch's default thread count

Prints a table (progress goes to stderr) and ENDS with one JSON line. Keys:

overhead_ratio_vs_bare
    Steps/s of so8t_exp's training path (``run_training`` in-process: metrics every step,
    system stats, heartbeat, progress log, rolling checkpoints every steps/4 mirrored to
    MLflow) over steps/s of a bare PyTorch loop doing the same maths (same tiny model from
    ``build.build_model``, same encoded sample data, batch, steps, seed, schedule, PET loss,
    clipping; no logging, no saving). 1.0 = no overhead; below 1 = slower.
throughput_ratio_vs_hf_trainer
    Same numerator over ``transformers.Trainer`` (``report_to=["mlflow"]``,
    ``logging_steps=1``, ``save_steps`` = steps/4) on the same model and batches.
    Steps/s are measured over windows of N steps starting at the end of step 1, so start-up
    (model build, MLflow run creation), the first step and the final save are outside them:
    ours from the MLflow timestamps of ``train/loss``, bare and HF from ``perf_counter`` at
    each step end. Rounds are interleaved with the order rotated; each ratio is the median
    over rounds of the ratio within a round (the ratio of medians over all windows is in
    the JSON too, as ``overhead_ratio_of_medians``). The loops run with one torch
    intra-op thread unless ``--threads`` says otherwise (why: ``bench/_overhead.py``).
checkpoint_stall_ratio
    Seconds a checkpoint blocks the training thread over a synchronous ``torch.save`` + fsync
    of the same full fine-tuning state (functions of ``bench/checkpoint_stall.py``; 116M
    parameters, 20M with --quick). Medians of interleaved saves.
resume_latency_ratio
    Wall time from starting ``python -m so8t_exp.resume tracking.uri=<store>`` to the first
    new optimizer step of a SIGKILLed run, over the time from starting
    ``python -m so8t_exp.train`` to its first step. Medians of alternating rounds
    (``bench/_resume.py``).
logging_overhead_fraction
    Training-thread time inside ``Tracker.log_metrics`` over wall time, in the same ``ours``
    runs (timed through a ``Tracker`` subclass the bench swaps in).
selection_seconds_1000_runs
    Median seconds for ``Launcher(...).decisions()`` plus picking the first "resume" in a
    sqlite store of 1,000 realistic runs, built once per invocation
    (``launcher_setup_seconds``; ``bench/_launcher_scale.py``).
ddp_scaling_efficiency
    Speedup / 2, where speedup = steps/s of ``torchrun --standalone --nproc-per-node=2 -m
    so8t_exp.train`` (2 gloo ranks, micro-batch B = 4 each, one torch thread each) over
    steps/s of ``python -m so8t_exp.train`` on the same global batch (micro-batch 2B, the
    same examples each step, one torch thread): 1.0 = linear scaling over two one-core
    workers. Steps/s from the MLflow timestamps of rank 0's ``train/loss`` from the end of
    step 2 to the last step (start-up, process-group join and the final evaluation and save
    outside the window); median over rotated rounds of the ratio within a round. Beside it,
    ``ddp_speedup_vs_all_cores``: the same DDP steps/s over one process with two torch
    threads (every core of a 2-core machine). ``bench/_ddp_scaling.py``.

The other keys give the figures behind the ratios, the rounds run and the CPU load the rest
of the machine put on it meanwhile (``other_load_cores``): read the ratios against it.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import _ddp_scaling
import _launcher_scale
import _overhead
import _resume
import torch
from _common import OtherLoad, log, machine, median, new_store, quiet
from checkpoint_stall import blocked_save, build, sync_save

from so8t_exp.checkpoint import Checkpointer
from so8t_exp.config import CheckpointConfig


@dataclass(frozen=True)
class Plan:
    steps: int  # steps per overhead measurement window
    windows: int  # windows per overhead run
    rounds: int  # at most this many interleaved rounds (bare, ours, HF) ...
    budget_s: float  # ... and none started that would end past this
    stall: tuple[int, int]  # (hidden size, layers) of the checkpoint-stall model
    resume: int  # at most this many fresh/resumed rounds (at least one) ...
    total_s: float  # ... and none started that would end past this (from the start)
    selections: int  # launcher selections timed
    threads: int = 1  # torch intra-op threads in the overhead loops (0: torch's default)
    ddp: tuple[int, int, float] = _ddp_scaling.QUICK  # DDP: steps per run, rounds, budget


PLANS = {
    "quick": Plan(20, 3, 4, 110.0, (384, 8), 3, 250.0, 3),
    "full": Plan(40, 4, 8, 360.0, (768, 12), 5, 1200.0, 5, ddp=_ddp_scaling.FULL),
}


# -- the benchmarks ----------------------------------------------------------------------
def bench_overhead(root: Path, plan: Plan, started: float) -> dict:
    """1 and 4: steps/s of ours vs bare vs HF Trainer; share of time in log_metrics."""
    res = _overhead.run(
        root,
        new_store(root),
        plan.steps,
        plan.windows,
        plan.rounds,
        plan.budget_s,
        plan.threads,
    )
    sps = {k: median(v) for k, v in res.sps.items()}
    step_ms = {k: median(v) for k, v in res.step_ms.items()}
    return {
        "steps": plan.steps,
        "threads": torch.get_num_threads(),
        "rounds": len(res.step_ms["ours"]),
        "windows": len(res.sps["ours"]),
        "steps_per_sec": sps,
        "median_step_ms": step_ms,
        "overhead_ratio_vs_bare": res.paired("ours", "bare"),
        "throughput_ratio_vs_hf_trainer": res.paired("ours", "hf"),
        "overhead_ratio_of_medians": sps["ours"] / sps["bare"],
        "hf_ratio_of_medians": sps["ours"] / sps["hf"],
        "overhead_ratio_per_round": [r["ours"] / r["bare"] for r in res.rounds],
        "overhead_ratio_median_step": step_ms["bare"] / step_ms["ours"],
        "logging_overhead_fraction": median(res.log_fraction),
        "log_metrics_call_us": median(res.log_call_us),
    }


def bench_stall(root: Path, plan: Plan, started: float, repeats: int = 3) -> dict:
    """2: blocked seconds per so8t_exp checkpoint vs a synchronous torch.save."""
    model, opt, sched = build(*plan.stall)
    ckpt = Checkpointer(
        root / "ckpt",
        CheckpointConfig(keep=2),
        None,
        lambda *a: None,
        lambda name, err: log(f"save failed: {name}: {err}"),
    )
    sync, blocked = [], []
    for i in range(repeats):  # interleaved
        sync.append(sync_save(model, opt, root / f"sync-{i}.pt"))
        (root / f"sync-{i}.pt").unlink()
        blocked.append(blocked_save(ckpt, model, opt, sched, i + 1))
    ckpt.close()
    n_params = sum(p.numel() for p in model.parameters())
    del model, opt, sched, ckpt
    gc.collect()
    return {
        "params_millions": n_params / 1e6,
        "repeats": repeats,
        "sync_save_seconds": median(sync),
        "blocked_seconds": median(blocked),
        "checkpoint_stall_ratio": median(blocked) / median(sync),
    }


def bench_launcher(root: Path, plan: Plan, started: float, n_runs: int = 1000) -> dict:
    """5: the launcher choosing a run among 1,000."""
    res = _launcher_scale.run(root, new_store(root), n_runs, plan.selections)
    return {
        "runs": res.n_runs,
        "setup_seconds": res.setup_seconds,
        "selections": len(res.selection),
        "first_selection_seconds": res.first,
        "selection_seconds": median(res.selection),
        "search_seconds": median(res.search),
        "decisions": dict(sorted(res.actions.items())),
        "chosen": res.chosen,
    }


def bench_resume(root: Path, plan: Plan, started: float) -> dict:
    """3: resume launcher to first new step vs fresh start to first step."""
    res = _resume.run(root, new_store(root), plan.resume, started + plan.total_s)
    return {
        "rounds": len(res.resumed),
        "fresh_seconds": median(res.fresh),
        "resumed_seconds": median(res.resumed),
        "launcher_seconds": median(res.launcher),
        "recomputed_steps": max(res.recomputed),
        "prepare_seconds": res.prepare_seconds,
        "resume_latency_ratio": median(res.resumed) / median(res.fresh),
    }


def bench_ddp(root: Path, plan: Plan, started: float) -> dict:
    """6: two gloo ranks vs one process on the same global batch."""
    steps, rounds, budget_s = plan.ddp
    return _ddp_scaling.summary(_ddp_scaling.run(root, new_store(root), steps, rounds, budget_s))


BENCHMARKS = {  # in running order; the resume rounds fill what is left of the time plan
    "overhead": bench_overhead,
    "stall": bench_stall,
    "launcher": bench_launcher,
    "resume": bench_resume,
    "ddp": bench_ddp,  # after resume: its rounds do not eat into resume's time plan
}


# -- output --------------------------------------------------------------------------------
def table(m: dict, r: dict, runtime: float, mode: str) -> str:
    o, s, z, la, load = r["overhead"], r["stall"], r["resume"], r["launcher"], r["load"]
    sps, ms = o["steps_per_sec"], o["median_step_ms"]
    d = r["ddp"]

    def loop(kind: str) -> str:
        return f"{sps[kind]:8.2f} steps/s   (median step {ms[kind]:6.1f} ms)"

    rows = [
        ("machine", f"{m['cpu_cores']} CPU cores, {m['memory_gib']} GiB RAM, {m['platform']}"),
        ("software", f"torch {m['torch']} ({m['torch_threads']} threads by default),"),
        ("", f"transformers {m['transformers']}, mlflow {m['mlflow']}, Python {m['python']}"),
        ("run", f"{mode}, {runtime:.0f} s in all"),
        None,
        (
            "1. framework overhead",
            f"{o['rounds']} interleaved rounds x "
            f"{o['windows'] // o['rounds']} windows of {o['steps']} steps, "
            f"save every {max(1, o['steps'] // 4)}",
        ),
        ("", f"{o['threads']} torch thread(s); other load {load['overhead']:.2f} cores"),
        ("   bare PyTorch loop", loop("bare")),
        ("   so8t_exp run_training", loop("ours")),
        ("   HF Trainer + MLflow", loop("hf")),
        (
            "   overhead_ratio_vs_bare",
            f"{o['overhead_ratio_vs_bare']:8.3f}   "
            f"(rounds {' '.join(f'{x:.3f}' for x in o['overhead_ratio_per_round'])}; "
            f"of medians {o['overhead_ratio_of_medians']:.3f}, "
            f"by median step {o['overhead_ratio_median_step']:.3f})",
        ),
        (
            "   throughput_ratio_vs_hf_trainer",
            f"{o['throughput_ratio_vs_hf_trainer']:8.3f}   "
            f"(of medians {o['hf_ratio_of_medians']:.3f})",
        ),
        (
            "2. checkpoint stall",
            f"{s['params_millions']:.1f} M parameters + AdamW state, "
            f"{s['repeats']} saves each; other load {load['stall']:.2f} cores",
        ),
        ("   synchronous torch.save + fsync", f"{s['sync_save_seconds'] * 1000:8.1f} ms"),
        ("   so8t_exp training thread blocked", f"{s['blocked_seconds'] * 1000:8.1f} ms"),
        ("   checkpoint_stall_ratio", f"{s['checkpoint_stall_ratio']:8.3f}"),
        ("3. resume latency", f"{z['rounds']} rounds; other load {load['resume']:.2f} cores"),
        ("   fresh train -> first step", f"{z['fresh_seconds']:8.2f} s"),
        (
            "   resume -> first new step",
            f"{z['resumed_seconds']:8.2f} s   (launcher before "
            f"starting the trainer {z['launcher_seconds']:.2f} s)",
        ),
        ("   resume_latency_ratio", f"{z['resume_latency_ratio']:8.3f}"),
        ("4. tracking cost", f"Tracker.log_metrics {o['log_metrics_call_us']:.0f} us per step"),
        ("   logging_overhead_fraction", f"{o['logging_overhead_fraction']:10.5f}"),
        (
            "5. launcher at scale",
            f"{la['runs']} runs, built in {la['setup_seconds']:.1f} s "
            f"(setup, not timed); other load {load['launcher']:.2f} cores",
        ),
        ("   decisions", ", ".join(f"{k} {v}" for k, v in la["decisions"].items())),
        ("   MLflow search alone", f"{la['search_seconds']:8.3f} s"),
        (
            "   first selection in a process",
            f"{la['first_selection_seconds']:8.3f} s   (MLflow engine set-up included)",
        ),
        ("   selection_seconds_1000_runs", f"{la['selection_seconds']:8.3f} s"),
        (
            "6. DDP scaling",
            f"{d['rounds']} rounds x {d['steps']} steps, global batch {d['global_batch']}; "
            f"other load {load['ddp']:.2f} cores",
        ),
        ("   1 process, 1 thread", f"{d['steps_per_sec']['solo']:8.2f} steps/s"),
        ("   2 gloo ranks, 1 thread each", f"{d['steps_per_sec']['ddp']:8.2f} steps/s"),
        ("   1 process, 2 threads", f"{d['steps_per_sec']['solo_all']:8.2f} steps/s"),
        (
            "   ddp_scaling_efficiency",
            f"{d['ddp_scaling_efficiency']:8.3f}   (speedup {d['speedup']:.3f}; "
            f"vs 1 process on all cores {d['ddp_speedup_vs_all_cores']:.3f})",
        ),
    ]
    width = max(len(row[0]) for row in rows if row) + 2
    return "\n".join(f"{row[0]:{width}}{row[1]}" if row else "" for row in rows)


def result_line(m: dict, r: dict, runtime: float, mode: str) -> dict:
    o, s, z, la, d = r["overhead"], r["stall"], r["resume"], r["launcher"], r["ddp"]
    return {
        "overhead_ratio_vs_bare": o["overhead_ratio_vs_bare"],
        "throughput_ratio_vs_hf_trainer": o["throughput_ratio_vs_hf_trainer"],
        "checkpoint_stall_ratio": s["checkpoint_stall_ratio"],
        "resume_latency_ratio": z["resume_latency_ratio"],
        "logging_overhead_fraction": o["logging_overhead_fraction"],
        "selection_seconds_1000_runs": la["selection_seconds"],
        "ddp_scaling_efficiency": d["ddp_scaling_efficiency"],
        "launcher_setup_seconds": la["setup_seconds"],
        "steps_per_sec": o["steps_per_sec"],
        "median_step_ms": o["median_step_ms"],
        "overhead_ratio_median_step": o["overhead_ratio_median_step"],
        "overhead_ratio_of_medians": o["overhead_ratio_of_medians"],
        "overhead_ratio_per_round": o["overhead_ratio_per_round"],
        "hf_ratio_of_medians": o["hf_ratio_of_medians"],
        "overhead_rounds": o["rounds"],
        "overhead_windows": o["windows"],
        "overhead_steps_per_window": o["steps"],
        "overhead_torch_threads": o["threads"],
        "log_metrics_call_us": o["log_metrics_call_us"],
        "stall_params_millions": s["params_millions"],
        "stall_blocked_seconds": s["blocked_seconds"],
        "stall_sync_seconds": s["sync_save_seconds"],
        "resume_rounds": z["rounds"],
        "resume_seconds": z["resumed_seconds"],
        "fresh_start_seconds": z["fresh_seconds"],
        "resume_launcher_seconds": z["launcher_seconds"],
        "launcher_search_seconds": la["search_seconds"],
        "launcher_first_selection_seconds": la["first_selection_seconds"],
        "ddp_speedup": d["speedup"],
        "ddp_speedup_vs_all_cores": d["ddp_speedup_vs_all_cores"],
        "ddp_steps_per_sec": d["steps_per_sec"],
        "ddp_per_round": d["per_round"],
        "ddp_rounds": d["rounds"],
        "ddp_steps": d["steps"],
        "ddp_global_batch": d["global_batch"],
        "ddp_threads": d["threads"],
        "ddp_max_loss_diff": d["max_loss_diff"],
        "ddp_tokens_per_step": d["tokens_per_step"],
        "ddp_efficiency_per_padded_token": d["efficiency_per_padded_token"],
        "ddp_other_load_cores": d["other_load_cores"],
        "other_load_cores": r["load"],
        "mode": mode,
        "runtime_seconds": runtime,
        "machine": m,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 5 minutes")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in the overhead loops (default 1; 0: one per core)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (printed)")
    args = ap.parse_args()
    quiet()
    mode = "quick" if args.quick else "full"
    plan = replace(PLANS[mode], threads=args.threads)
    m = machine()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="so8t-bench-"))
    results: dict = {"load": {}}
    try:
        for name, fn in BENCHMARKS.items():
            log(f"[{time.monotonic() - started:5.0f} s] {name} ...")
            (root / name).mkdir()
            with OtherLoad() as load:
                results[name] = fn(root / name, plan, started)
            results["load"][name] = load.cores
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    runtime = time.monotonic() - started
    print(table(m, results, runtime, mode))
    print(json.dumps(_rounded(result_line(m, results, runtime, mode))), flush=True)


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6 if abs(x) < 0.01 else 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


if __name__ == "__main__":
    main()
