"""Screenshots of the MLflow UI as a user meets it, in headless Chromium.

    python bench/ui_screenshots.py --store sqlite:////abs/mlruns/mlflow.db --out shots/

Starts ``mlflow server`` on 127.0.0.1 for the store, then saves one PNG per page: the
experiment's runs, each run's overview, model metrics and artifacts (the confusion matrix),
the compare page of two runs, the registered models and each model's page. Needs Debian's
``chromium`` (``apt-get install chromium``). Prints the files it wrote; look at them.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    "--virtual-time-budget=25000",  # the UI is a single-page app: let it fetch and draw
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, artifacts: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", store, "--default-artifact-root", artifacts.as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not come up")


def shoot(chromium: str, url: str, png: Path, profile: Path) -> None:
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", url]
    subprocess.run(cmd, capture_output=True, timeout=180, check=False)
    print(f"{png}  <- {url}" if png.is_file() else f"FAILED {url}")


def pages(client: MlflowClient, experiment: str) -> dict[str, str]:
    """File stem -> UI route (hash router) for what a user looks at."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    out = {"runs": f"#/experiments/{exp.experiment_id}/runs"}
    for i, run in enumerate(runs[:2]):
        base = f"#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
        out[f"run{i}_overview"] = base
        out[f"run{i}_metrics"] = f"{base}/model-metrics"
        out[f"run{i}_confusion"] = f"{base}/artifacts/eval/confusion_matrix.png"
    if len(runs) >= 2:
        ids = ",".join(f'"{r.info.run_id}"' for r in runs[:2])
        out["compare"] = f'#/compare-runs?runs=[{ids}]&experiments=["{exp.experiment_id}"]'
    out["models"] = "#/models"
    for model in client.search_registered_models():
        out[f"model_{model.name}"] = f"#/models/{model.name}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="tracking URI of the store to show (sqlite:///...)")
    parser.add_argument("--experiment", default="so8t")
    parser.add_argument("--out", type=Path, default=Path("ui_screenshots"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("no chromium on PATH: apt-get install chromium")
    if not args.store or not args.store.startswith("sqlite:///"):
        sys.exit("--store sqlite:///<abs path to mlflow.db> (artifacts beside it)")
    db = Path(args.store.removeprefix("sqlite:///"))
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(args.store, db.parent / "artifacts", port)
    profile = Path(tempfile.mkdtemp(prefix="so8t-chromium-"))
    try:
        for stem, route in pages(MlflowClient(args.store), args.experiment).items():
            shoot(chromium, f"http://127.0.0.1:{port}/{route}", args.out / f"{stem}.png", profile)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
