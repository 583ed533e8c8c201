"""Two hosts, one run: a trainer cut off from the tracking server is taken over by a launcher
on another host, and when the network heals it stops without writing anything more.

Real parts throughout: a real ``mlflow server``; host A's trainer reaches it through a real
TCP proxy that the test turns into a black hole (a network partition); host B (a distinct
``SO8T_HOST_ID`` and project folder on this machine) reaches it directly.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import history, start_train, subprocess_env, wait_for

pytestmark = pytest.mark.slow

WRITES = (b"POST ", b"PUT ", b"DELETE ", b"PATCH ")


class Partition:
    """A TCP proxy to ``target`` that can black-hole traffic: while cut, bytes in either
    direction are swallowed (the client sees a hang, then its own timeout). It records the
    request lines it forwards from clients, with the time."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.cut = target, False
        self.requests: list[tuple[float, bytes]] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            for src, dst, record in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, record), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if self.cut:
                    continue  # swallowed: a partition, not a refusal
                if record and chunk.startswith(WRITES + (b"GET ",)):
                    self.requests.append((time.time(), chunk.split(b"\r\n", 1)[0]))
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def writes_after(self, t: float) -> list[bytes]:
        return [line for at, line in self.requests if at > t and line.startswith(WRITES)]


@pytest.fixture
def reaped():
    """Processes to kill when the test ends, however it ends."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def newest_run(client: MlflowClient):
    exp = client.get_experiment_by_name("so8t")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0] if runs else None


def test_a_cut_off_trainer_is_fenced_when_another_host_takes_over(
    tmp_path: Path, mlflow_server, reaped
):
    host, port = mlflow_server.removeprefix("http://").split(":")
    proxy = Partition((host, int(port)))
    client = MlflowClient(mlflow_server)
    bounded = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    home_a.mkdir()
    home_b.mkdir()
    env_a = subprocess_env(home_a, SO8T_HOST_ID="host-a", SO8T_FAULT_STEP_SECONDS="0.3", **bounded)
    run_dir = home_a / "run"
    trainer_a = start_train(
        home_a,
        f"http://127.0.0.1:{proxy.port}",
        run_dir,
        "+experiment=smoke",
        "trainer.max_steps=120",
        "checkpoint.every_n_steps=4",
        "session.heartbeat_seconds=0.5",
        env=env_a,
    )
    reaped.append(trainer_a)

    def mirrored_step() -> int:
        run = newest_run(client)
        return int(run.data.tags.get("so8t.checkpoint.latest_step", 0)) if run else 0

    wait_for(lambda: mirrored_step() >= 8, timeout=180, proc=trainer_a, what="a checkpoint")
    run_id = newest_run(client).info.run_id
    proxy.cut = True
    launcher_b = subprocess.Popen(
        [sys.executable, "-m", "so8t_exp.resume", f"tracking.uri={mlflow_server}"]
        + ["resume.stale_after_seconds=6"],
        cwd=home_b,
        env=subprocess_env(home_b, SO8T_HOST_ID="host-b"),
        stdout=open(home_b / "launcher.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    reaped.append(launcher_b)
    wait_for(
        lambda: "so8t.resume.claim.2" in client.get_run(run_id).data.params,
        timeout=180,
        proc=launcher_b,
        what="host B's claim",
    )
    assert trainer_a.poll() is None, "host A's trainer must still be running, cut off"
    healed = time.time()
    proxy.cut = False
    code_a = trainer_a.wait(120)
    log_a = next(home_a.glob("run.*.log")).read_text()
    assert code_a == 5, log_a[-3000:]
    assert "fenced" in log_a and "host-b" in log_a
    assert proxy.writes_after(healed) == [], "host A wrote after the network healed"
    assert launcher_b.wait(400) == 0, (home_b / "launcher.log").read_text()[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["so8t.host"] == "host-b"
    steps = [s for s, _ in history(client, run_id, "train/loss")]
    assert steps == list(range(1, 121))  # each step once: none from A after the takeover
    watched = (home_b / "launcher.log").read_text()
    assert "watching 1 run(s)" in watched and "last on host-a" in watched
