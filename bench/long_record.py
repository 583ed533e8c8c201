"""Peak memory of a run whose data holds one huge record, against the same run without it.

    python bench/long_record.py            # a 50 MB record (the issue's case)
    python bench/long_record.py --mb 200

Each run is ``python -m so8t_exp.train +experiment=smoke trainer.max_steps=2`` in its own
process; its peak RSS is read from ``getrusage(RUSAGE_CHILDREN)`` by a small wrapper
process of its own, so each figure is that run's high-water mark alone.
The baseline trains on the bundled sample set; the other on the same set plus one record
whose answer is ``--mb`` megabytes. Records are cut to ``data.max_length`` ×
``CHARS_PER_TOKEN_BOUND`` characters as they are read, so the tokenizer never sees the
rest: the ratio should stay near 1. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import subprocess_env
from mlflow.tracking import MlflowClient

from so8t_exp.paths import asset_path, sqlite_uri

# Runs the trainer as its child and prints the child's peak RSS (KiB on Linux): each
# measurement gets a fresh RUSAGE_CHILDREN, so one run's high-water mark never hides another's.
_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def peak_rss_mb(home: Path, files: list[Path], name: str) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, data.too_long_records) of one two-step smoke run."""
    store = sqlite_uri(home / name / "mlflow.db")
    listing = "[" + ",".join(str(f) for f in files) + "]"
    cmd = [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "so8t_exp.train"]
    cmd += ["+experiment=smoke", "trainer.max_steps=2", "trainer.progress_bar=false"]
    cmd += [f"tracking.uri={store}", f"data.files={listing}", f"hydra.run.dir={home / name}"]
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=home, env=subprocess_env(home), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{name} run failed:\n{out.stderr[-3000:]}")
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("so8t").experiment_id])[0]
    return peak_kib / 1024, seconds, run.data.params.get("data.too_long_records", "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the huge record")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="so8t-long-"))
    try:
        huge = home / "huge.jsonl"
        text = ("SO8T long answer. " * (int(args.mb * 2**20) // 18 + 1))[: int(args.mb * 2**20)]
        record = {"instruction": "Summarise.", "output": text, "four_class_label": "ALLOW"}
        huge.write_text(json.dumps(record) + "\n", encoding="utf-8")
        sample = asset_path("data/so8t_sample.jsonl")
        base_mb, base_s, _ = peak_rss_mb(home, [sample], "baseline")
        long_mb, long_s, too_long = peak_rss_mb(home, [sample, huge], "with_huge_record")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    ratio = long_mb / base_mb
    print(f"baseline (sample set)          peak RSS {base_mb:8.1f} MiB   {base_s:6.1f} s")
    print(f"+ one {args.mb:g} MB record         peak RSS {long_mb:8.1f} MiB   {long_s:6.1f} s")
    print(f"long_record_peak_rss_ratio     {ratio:.3f}   (huge record skipped: {too_long})")
    result = {
        "record_mb": args.mb,
        "baseline_peak_rss_mib": round(base_mb, 1),
        "long_record_peak_rss_mib": round(long_mb, 1),
        "long_record_peak_rss_ratio": round(ratio, 3),
        "seconds": [round(base_s, 1), round(long_s, 1)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
