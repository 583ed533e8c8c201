"""How long does a checkpoint block the training thread?

Full fine-tuning state of a Phi-3-architecture model (~113M parameters by default: weights
plus AdamW moments) is saved repeatedly through so8t_exp's checkpointer, which only snapshots
into host memory on the calling thread and writes in a background worker. The baseline,
measured in the same run on the same state, is a synchronous ``torch.save`` of the model and
optimizer state dicts (plus fsync), which is what blocks a loop that saves inline.

    python bench/checkpoint_stall.py            # ~113M parameters, 3 saves each
    python bench/checkpoint_stall.py --quick    # ~14M parameters

Prints a table and one JSON line with ``checkpoint_stall_ratio`` (blocked / synchronous).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Phi3Config, Phi3ForCausalLM

from so8t_exp.checkpoint import Checkpointer, RNGState, capture
from so8t_exp.config import CheckpointConfig


def build(hidden: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    cfg = Phi3Config(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(0, 2048, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # populate the AdamW moments
    opt.step()
    opt.zero_grad()
    return model, opt, sched


def sync_save(model, opt, path: Path) -> float:
    started = time.perf_counter()
    with open(path, "wb") as fh:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - started


def blocked_save(ckpt: Checkpointer, model, opt, sched, step: int) -> float:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    started = time.perf_counter()
    payload = capture(
        params=dict(model.named_parameters()),
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        buffers=ckpt.buffers,  # (as in the trainer: one arena reused by every save)
        rng=RNGState.now(),
        state={"progress": {"step": step}},
    )
    ckpt.save("rolling", step, payload)
    blocked = time.perf_counter() - started
    ckpt.drain()  # the next save would wait for this one anyway; keep them separate
    return blocked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    hidden, layers = (384, 8) if args.quick else (768, 12)
    model, opt, sched = build(hidden, layers)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = Checkpointer(
            root / "ckpt",
            CheckpointConfig(keep=2),
            None,
            lambda *a: None,
            lambda name, err: print("save failed:", name, err),
        )
        sync, blocked = [], []
        for i in range(args.repeats):  # interleaved, so drift hits both alike
            sync.append(sync_save(model, opt, root / f"sync-{i}.pt"))
            blocked.append(blocked_save(ckpt, model, opt, sched, i + 1))
        ckpt.close()
    sync_med, blocked_med = statistics.median(sync), statistics.median(blocked)
    ratio = blocked_med / sync_med
    print(f"model parameters           {n_params / 1e6:8.1f} M (full fine-tuning state)")
    print(f"synchronous torch.save     {sync_med * 1000:8.1f} ms  (median of {len(sync)})")
    print(f"so8t_exp blocked per save  {blocked_med * 1000:8.1f} ms  (median of {len(blocked)})")
    print(f"checkpoint_stall_ratio     {ratio:8.3f}")
    print(
        json.dumps(
            {
                "params_millions": round(n_params / 1e6, 1),
                "sync_save_seconds": round(sync_med, 4),
                "blocked_seconds": round(blocked_med, 4),
                "checkpoint_stall_ratio": round(ratio, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
