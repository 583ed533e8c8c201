"""GPU check: the full-size Phi-3.5-mini architecture, random weights, through so8t_exp on CUDA.

One call on one GPU (made for an H100; no network needed: nothing is downloaded):

    python bench/gpu_check.py                 # 32 layers, seq 1024: a few minutes
    python bench/gpu_check.py --layers 4      # a quick try of the same path
    python bench/gpu_check.py --cpu-smoke     # no GPU: the same logic, tiny model, float32

What it builds: the config of ``python -m so8t_exp.train +experiment=borea`` (composed
with Hydra's compose API, as ``bench/_common.py`` does: Borea's SO8T adapters, LoRA r=16
on qkv/o/gate_up/down, safety head, gradient checkpointing, bf16 autocast, AdamW), with
``model.source`` swapped for :class:`RandomPhi35`: Phi-3.5-mini's architecture (hidden
3072, 32 layers, 32 heads and KV heads, intermediate 8192, vocab 32064, longrope with
original context 4096, 131072 positions) with seeded random weights in bfloat16, built
directly on the GPU, and the bundled offline tokenizer (its 2,048 ids fit the 32,064-row
embedding). The data is synthetic: the bundled records' texts repeated so that every
example is exactly ``--seq-len`` tokens (prompt cut from its start, answer ``seq-len/2``).

What it measures and checks (printed, then ONE JSON line at the end):

* tokens/s of so8t_exp's training path (``run_training`` in-process, as
  ``bench/_overhead.py``'s ``ours_loop``: metrics every step, NVML system stats every
  second, heartbeat, progress log, rolling checkpoints every steps/4 mirrored to MLflow)
  against ``transformers.Trainer`` on the same model, batches, steps and save period
  (``report_to=["mlflow"]``, ``bf16=True``; as ``_overhead.hf_loop``). Both over the window
  from the end of step ``--skip`` to the end of the last step (start-up, first steps, the
  final evaluation and save outside it): ours from the MLflow timestamps of
  ``train/loss``, HF from ``perf_counter`` at each ``on_step_end``; tokens = the
  attention-mask tokens of those steps (identical for both). One run each, ours first.
* checkpoint stall per rolling save: ``checkpoint/blocked_seconds`` from MLflow (the
  training thread's time in ``TrainingRun._save``), against HF's synchronous save
  (``on_step_end`` to ``on_save`` of a saving step).
* NVML readings reaching MLflow: ``system/gpu0/{temperature_c, utilization_percent,
  memory_used_gb, power_w}`` read back from the store after the run; absent = failure.
* the rolling checkpoint's ``rng`` group holds a ``torch_cuda/0`` state.
* CUDA AMP/bf16: ``resolve_device`` picks (cuda, bf16), an autocast matmul gives bfloat16,
  the frozen base is bfloat16 and every logged ``train/loss`` is finite.

Exit status 0 when every check passed, 1 when one failed (the JSON line says which), 2
without a CUDA GPU (unless ``--cpu-smoke``). In ``--cpu-smoke`` the GPU-only checks are
reported as ``skipped``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NVML_METRICS = ("temperature_c", "utilization_percent", "memory_used_gb", "power_w")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 30; smoke 8)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (Phi-3.5-mini: 32)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per example (1024)")
    ap.add_argument("--micro-batch", type=int, default=2, help="trainer.micro_batch_size")
    ap.add_argument("--accum", type=int, default=4, help="trainer.grad_accum_steps")
    ap.add_argument("--skip", type=int, default=2, help="steps before the measured window")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF Trainer comparison")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="no GPU: 2 layers, hidden 128, vocab 4096, float32 on CPU (this script's logic)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (printed)")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    args.steps = args.steps or (8 if smoke else 30)
    args.seq_len = args.seq_len or (128 if smoke else 1024)
    if smoke and args.layers == 32:
        args.layers = 2
    if args.steps < 4 or args.skip < 1 or args.skip >= args.steps:
        ap.error("--steps must be >= 4 and --skip in [1, steps)")
    if args.seq_len < 64:
        ap.error("--seq-len must be >= 64")
    return args


def cuda_or_exit(args: argparse.Namespace):
    """torch, after checking there is a CUDA GPU (or --cpu-smoke)."""
    import torch

    if args.cpu_smoke:
        return torch
    if not torch.cuda.is_available():
        print(
            "gpu_check.py needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
            "Run it on a GPU machine, or pass --cpu-smoke to exercise its logic on CPU.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return torch


# -- the model source --------------------------------------------------------------------
@dataclass
class RandomPhi35:
    """Phi-3.5-mini's architecture with seeded random weights (no download) and the bundled
    tokenizer: a ``model.source`` for so8t_exp's build path (``_target_:
    gpu_check.RandomPhi35``). Defaults are Phi-3.5-mini-instruct's config.json."""

    tokenizer_path: str
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    sliding_window: int = 262144
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dtype: str = "bfloat16"
    device: str = "auto"  # where the weights are created: auto = cuda when there is one
    init_seed: int = 0

    def load(self):
        import torch
        from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        if len(tokenizer) > self.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids > vocab {self.vocab_size}")
        half_head = self.hidden_size // self.num_attention_heads // 2
        config = Phi3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            original_max_position_embeddings=self.original_max_position_embeddings,
            # (the real short/long factors are in the checkpoint's config; 1.0 costs the same)
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0] * half_head,
                "long_factor": [1.0] * half_head,
                "factor": self.max_position_embeddings / self.original_max_position_embeddings,
            },
            rope_theta=self.rope_theta,
            sliding_window=self.sliding_window,
            rms_norm_eps=self.rms_norm_eps,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, self.dtype)
        previous = torch.get_default_dtype()
        # As TinyPhi3: a private generator state (the global RNG drives training).
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(self.init_seed)
            torch.set_default_dtype(dtype)  # (as from_pretrained(dtype=...) builds)
            try:
                with torch.device(device):
                    model = Phi3ForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
        return model, tokenizer

    def describe(self) -> dict:
        return {"kind": "random_phi35", **asdict(self)}


# -- config and data ---------------------------------------------------------------------
def write_data(path: Path, tokenizer, seq_len: int, n: int = 64) -> None:
    """``n`` records whose chat encoding is at least ``seq_len`` tokens (the prompt is cut
    to fit), answers of about ``seq_len / 2`` tokens, the bundled four-class labels."""
    from so8t_exp import data
    from so8t_exp.paths import asset_path

    base = data.read_jsonl(asset_path("data/so8t_sample.jsonl"), "error")[0]

    def pieces(texts: list[str]) -> list[tuple[str, int]]:
        return [
            (t + "\n", len(tokenizer(t + "\n", add_special_tokens=False)["input_ids"]))
            for t in texts
        ]

    def grow(parts: list[tuple[str, int]], k: int, tokens: int) -> str:
        """Pieces from the ``k``-th on (cyclically) until their tokens reach ``tokens``,
        cut to about ``tokens`` tokens."""
        out, count, i = [], 0, k
        while count < tokens:
            text, n_tokens = parts[i % len(parts)]
            out.append(text)
            count, i = count + n_tokens, i + 1
        text = "".join(out)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = offsets["offset_mapping"]
        return text[: offsets[tokens][0]] if len(offsets) > tokens else text

    answers, prompts = pieces([r.output for r in base]), pieces([r.prompt for r in base])
    with path.open("w", encoding="utf-8") as fh:
        for k in range(n):
            record = {
                "instruction": grow(prompts, k, seq_len),  # cut from its start to fit
                "output": grow(answers, k, seq_len // 2),
                "four_class_label": base[k % len(base)].four_class_label,
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def compose(args, store: str, data_file: Path, device: str):
    from _common import compose_train
    from omegaconf import OmegaConf

    from so8t_exp.paths import asset_path

    total, save_every = args.steps + args.skip, max(1, args.steps // 4)
    cfg = compose_train(
        store,
        "+experiment=borea",
        f"trainer.max_steps={total}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.grad_accum_steps={args.accum}",
        f"trainer.eval_every_n_steps={total}",  # one evaluation, after the last step
        "trainer.eval_max_batches=1",
        f"trainer.device={device}",
        f"trainer.precision={'fp32' if args.cpu_smoke else 'auto'}",
        f"trainer.scheduler.warmup_steps={args.skip}",
        f"checkpoint.every_n_steps={save_every}",
        "tracking.experiment=gpu_check",
        "tracking.system_stats_interval_seconds=1",
        "tracking.log_models=[]",  # no export of a 7.6 GB model at the end
        "session.heartbeat_seconds=5",
        "progress.interval_seconds=5",
        "notify=none",
        f"data.files=[{json.dumps(str(data_file))}]",
        f"data.max_length={args.seq_len}",
    )
    source: dict = {
        "_target_": "gpu_check.RandomPhi35",
        "tokenizer_path": str(asset_path("tokenizer")),
        "num_hidden_layers": args.layers,
        "init_seed": cfg.seed,
    }
    if args.cpu_smoke:
        source.update(hidden_size=128, intermediate_size=256, num_attention_heads=4)
        source.update(num_key_value_heads=4, vocab_size=4096, dtype="float32")
    cfg.model.source = OmegaConf.create(source)
    return cfg, total, save_every


def step_tokens(cfg, total: int) -> list[int]:
    """Attention-mask tokens of each step (what both loops train on)."""
    from transformers import AutoTokenizer

    from so8t_exp import build, data

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.source.tokenizer_path)
    examples, _ = build.encode_records(cfg, tokenizer, data.load_dataset(cfg.data).train)
    t = cfg.trainer
    plan = data.BatchPlan(examples, t.micro_batch_size, t.grad_accum_steps, cfg.seed, 0)
    return [
        sum(int(b["attention_mask"].sum()) for b in plan.micro_batches(s)) for s in range(total)
    ]


def window_rate(ends: list[float], tokens: list[int], skip: int) -> tuple[float, float]:
    """(tokens/s, steps/s) from the end of step ``skip`` to the end of the last step."""
    seconds = ends[-1] - ends[skip - 1]
    return sum(tokens[skip : len(ends)]) / seconds, (len(ends) - skip) / seconds


# -- the two loops -----------------------------------------------------------------------
def ours(cfg, session: Path, store: str, total: int) -> dict:
    """``run_training`` in-process; what it logged, read back from MLflow."""
    from mlflow.tracking import MlflowClient

    from so8t_exp.run import run_training

    code = run_training(cfg, session)
    if code != 0:
        raise RuntimeError(f"run_training exited {code}")
    run_id = json.loads((session / "session_info.json").read_text())["session_id"]
    client = MlflowClient(store)

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))

    loss = history("train/loss")
    if len(loss) != total:
        raise RuntimeError(f"expected {total} train/loss points, got {len(loss)}")
    return {
        "run_id": run_id,
        "ends": [m.timestamp / 1000 for m in loss],
        "loss": [m.value for m in loss],
        "in_loop_tokens_per_sec": [m.value for m in history("train/tokens_per_sec")],
        "blocked": [(m.step, m.value) for m in history("checkpoint/blocked_seconds")],
        "nvml": {k: [m.value for m in history(f"system/gpu0/{k}")] for k in NVML_METRICS},
        "cpu_percent": [m.value for m in history("system/cpu_percent")],
    }


def hf(cfg, out_dir: Path, store: str, total: int, save_every: int) -> dict:
    """``transformers.Trainer`` on the same model (the project's builder), batches, schedule
    and save period, logging to MLflow (as ``bench/_overhead.py``'s ``hf_loop``, on the run's
    device and precision)."""
    import mlflow
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from so8t_exp import build, data, objective, so8t
    from so8t_exp.build import seed_everything
    from so8t_exp.trainer import amp_context

    device, precision = build.resolve_device(cfg.trainer)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    model, tokenizer, adapters, head = build.build_model(cfg, build.build_source(cfg))
    model.to(device).train()
    base_dtype = str(next(p for p in model.parameters() if not p.requires_grad).dtype)
    examples, _ = build.encode_records(cfg, tokenizer, data.load_dataset(cfg.data).train)
    t = cfg.trainer
    accum = t.grad_accum_steps
    plan = data.BatchPlan(examples, t.micro_batch_size, accum, cfg.seed, tokenizer.pad_token_id)
    autocast = amp_context(device, precision)
    ends: list[float] = []
    saves: list[tuple[int, float]] = []

    class Batches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return total * accum

        def __getitem__(self, i: int) -> dict:
            return plan.micro_batches(i // accum)[i % accum]

    class SO8TTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step = self.state.global_step
            so8t.set_alpha(adapters, so8t.alpha_at(step, cfg.model.so8t.alpha_gate, total))
            out = objective.forward(model, adapters, head, inputs, autocast)
            pet_weight = so8t.pet_weight_at(step, cfg.model.so8t.pet, total)
            loss = out.loss(
                objective.Counts.of([inputs]), pet_weight, cfg.model.safety_head.loss_weight
            )
            return (loss, out) if return_outputs else loss

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

        def on_save(self, args, state, control, **kwargs):
            saves.append((state.global_step, time.perf_counter() - ends[-1]))

    opt = t.optimizer
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=total,
        per_device_train_batch_size=1,  # one item = one collated micro-batch
        gradient_accumulation_steps=accum,
        learning_rate=opt.lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.scheduler.min_lr_ratio},
        warmup_steps=t.scheduler.warmup_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=cfg.checkpoint.keep,
        eval_strategy="no",
        report_to=["mlflow"],
        seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "hf_trainer"
    mlflow.set_tracking_uri(store)
    trainer = SO8TTrainer(
        model=model,
        args=args,
        train_dataset=Batches(),
        data_collator=lambda items: items[0],
        callbacks=[StepClock()],
    )
    for printer in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(printer)
    trainer.train()
    if mlflow.active_run() is not None:
        mlflow.end_run()
    if len(ends) != total:
        raise RuntimeError(f"HF Trainer ran {len(ends)} steps, expected {total}")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"ends": ends, "saves": saves, "base_dtype": base_dtype, "loss": losses}


# -- checks ------------------------------------------------------------------------------
def rng_groups(session: Path) -> dict:
    """The tensors of the newest rolling checkpoint's ``rng`` group."""
    from safetensors import safe_open

    from so8t_exp.checkpoint import newest_valid

    folder = newest_valid(session / "checkpoints", "rolling")
    if folder is None:
        return {"checkpoint": None, "keys": []}
    with safe_open(str(folder / "rng.safetensors"), "pt") as fh:
        keys = sorted(fh.keys())
    return {"checkpoint": folder.name, "keys": keys}


def amp_check(torch, cfg) -> dict:
    from so8t_exp import build
    from so8t_exp.trainer import amp_context

    device, precision = build.resolve_device(cfg.trainer)
    out = {"device": str(device), "precision": precision}
    if device.type == "cuda":
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
        a = torch.randn(256, 256, device=device)
        with amp_context(device, precision)():
            out["autocast_matmul_dtype"] = str((a @ a).dtype)
    return out


def stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "min": min(xs),
        "median": statistics.median(xs),
        "max": max(xs),
    }


def free(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def peak_gb(torch) -> float | None:
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    return peak


# -- main --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch = cuda_or_exit(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: say so early
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check, _common
    from _common import log, machine, new_store, quiet
    from transformers import AutoTokenizer

    from so8t_exp.paths import asset_path

    quiet()
    started = time.monotonic()
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    device = "cpu" if args.cpu_smoke else "cuda"
    root = Path(tempfile.mkdtemp(prefix="so8t-gpu-check-"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result: dict = {"mode": mode, "gpu": gpu, "machine": machine()}
    result.update(
        layers=args.layers,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        grad_accum=args.accum,
        steps=args.steps + args.skip,
        window_steps=args.steps,
        cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    checks: dict[str, str] = {}
    failures: list[str] = []

    def check(name: str, ok: bool | None, why: str) -> None:
        checks[name] = "skipped" if ok is None else ("pass" if ok else "fail")
        if ok is False:
            failures.append(f"{name}: {why}")
        log(f"  check {name}: {checks[name]} ({why})")

    try:
        store = new_store(root)
        data_file = root / "synthetic.jsonl"
        tokenizer = AutoTokenizer.from_pretrained(str(asset_path("tokenizer")))
        write_data(data_file, tokenizer, args.seq_len)
        cfg, total, save_every = compose(args, store, data_file, device)
        tokens = step_tokens(cfg, total)
        log(
            f"[{mode}] {gpu or 'CPU'}: {args.layers} layers, seq {args.seq_len}, micro-batch "
            f"{args.micro_batch} x accum {args.accum} ({tokens[0]} tokens/step), {total} "
            f"steps ({args.skip} before the window), save every {save_every}"
        )
        result.update(
            save_every=save_every,
            tokens_per_step=statistics.mean(tokens),
            deterministic=cfg.trainer.deterministic,
        )
        # 1. so8t_exp's training path
        amp = amp_check(torch, cfg)
        result["amp"] = amp
        t0 = time.monotonic()
        log(f"[{time.monotonic() - started:5.0f} s] so8t_exp run_training ...")
        o = ours(cfg, root / "ours", store, total)
        result["ours_wall_seconds"] = time.monotonic() - t0
        result["ours_peak_gpu_memory_gb"] = peak_gb(torch)
        o_tps, o_sps = window_rate(o["ends"], tokens, args.skip)
        blocked = [v for s, v in o["blocked"]]
        result.update(
            ours_tokens_per_sec=o_tps,
            ours_steps_per_sec=o_sps,
            ours_in_loop_tokens_per_sec_median=statistics.median(o["in_loop_tokens_per_sec"]),
            checkpoint_blocked_seconds=blocked,
            checkpoint_blocked_seconds_median=statistics.median(blocked) if blocked else None,
            ours_median_step_seconds=statistics.median(
                b - a
                for a, b in zip(o["ends"][args.skip - 1 : -1], o["ends"][args.skip :], strict=True)
            ),
            ours_loss_first_last=[o["loss"][0], o["loss"][-1]],
        )
        log(
            f"  ours: {o_tps:,.0f} tokens/s, {o_sps:.3f} steps/s; blocked per save "
            f"{' '.join(f'{b * 1000:.1f}' for b in blocked)} ms"
        )
        nvml = {k: stats(v) for k, v in o["nvml"].items()}
        result["nvml"] = nvml
        for k, s in nvml.items():
            log(f"  system/gpu0/{k}: {s}")
        rng = rng_groups(root / "ours")
        result["rng"] = rng
        free(torch)
        result["gpu_memory_after_ours_gb"] = (
            torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else None
        )

        # 2. the HF Trainer on the same model
        if not args.no_hf:
            log(f"[{time.monotonic() - started:5.0f} s] HF Trainer ...")
            t0 = time.monotonic()
            h = hf(cfg, root / "hf", store, total, save_every)
            result["hf_wall_seconds"] = time.monotonic() - t0
            result["hf_peak_gpu_memory_gb"] = peak_gb(torch)
            h_tps, h_sps = window_rate(h["ends"], tokens, args.skip)
            save_s = [s for _, s in h["saves"]]
            result.update(
                hf_tokens_per_sec=h_tps,
                hf_steps_per_sec=h_sps,
                throughput_ratio_vs_hf_trainer=o_tps / h_tps,
                hf_save_seconds=save_s,
                hf_save_seconds_median=statistics.median(save_s) if save_s else None,
                hf_base_dtype=h["base_dtype"],
            )
            log(
                f"  HF: {h_tps:,.0f} tokens/s, {h_sps:.3f} steps/s; save "
                f"{' '.join(f'{s * 1000:.1f}' for s in save_s)} ms"
            )
            free(torch)

        # 3. the checks
        gpu_only = None if args.cpu_smoke else True
        finite = all(math.isfinite(x) for x in o["loss"])
        check("train_loss_finite", finite, f"{len(o['loss'])} train/loss values")
        check(
            "rolling_saves_blocked_seconds",
            len(blocked) >= 1,
            f"{len(blocked)} checkpoint/blocked_seconds values",
        )
        for k, s in nvml.items():
            ok = None if args.cpu_smoke else s["n"] > 0  # (no GPU, no NVML readings)
            check(f"nvml_{k}", ok, f"system/gpu0/{k}: {s['n']} values in MLflow")
        has_cuda_rng = "torch_cuda/0" in rng["keys"]
        check(
            "cuda_rng_in_checkpoint",
            has_cuda_rng if gpu_only else (None if not has_cuda_rng else False),
            f"{rng['checkpoint']}: rng keys {rng['keys']}",
        )
        if gpu_only:
            bf16_ok = (
                amp["precision"] == "bf16"
                and amp.get("bf16_supported")
                and amp.get("autocast_matmul_dtype") == "torch.bfloat16"
                and result.get("hf_base_dtype", "torch.bfloat16") == "torch.bfloat16"
            )
            check("cuda_amp_bf16", bool(bf16_ok), json.dumps(amp))
        else:
            check("cuda_amp_bf16", None, json.dumps(amp))
    except Exception as err:
        failures.append(f"exception: {type(err).__name__}: {err}")
        log(f"FAILED: {type(err).__name__}: {err}")
        import traceback

        traceback.print_exc()
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    result.update(checks=checks, failures=failures, ok=not failures)
    result["runtime_seconds"] = time.monotonic() - started
    print(summary(result) if "tokens_per_step" in result else "gpu_check: " + str(failures))
    print(json.dumps(_rounded(result)), flush=True)
    return 0 if not failures else 1


def summary(r: dict) -> str:
    def f(key: str, fmt: str = "{:,.0f}") -> str:
        v = r.get(key)
        return "n/a" if v is None else fmt.format(v)

    lines = [
        f"gpu_check ({r['mode']}): {r['gpu'] or 'CPU'}, {r['layers']} layers, seq {r['seq_len']}, "
        f"{r['tokens_per_step']:.0f} tokens/step, {r['window_steps']} measured steps",
        f"  so8t_exp run_training   {f('ours_tokens_per_sec')} tokens/s",
        f"  HF Trainer + MLflow     {f('hf_tokens_per_sec')} tokens/s",
        f"  throughput_ratio_vs_hf  {f('throughput_ratio_vs_hf_trainer', '{:.3f}')}",
        f"  checkpoint blocked      {f('checkpoint_blocked_seconds_median', '{:.4f}')} s median"
        f" per rolling save (HF save {f('hf_save_seconds_median', '{:.3f}')} s)",
        f"  peak GPU memory         ours {f('ours_peak_gpu_memory_gb', '{:.1f}')} GB, "
        f"HF {f('hf_peak_gpu_memory_gb', '{:.1f}')} GB",
        f"  checks                  {', '.join(f'{k} {v}' for k, v in r['checks'].items())}",
    ]
    if r["failures"]:
        lines.append("  FAILURES: " + "; ".join(r["failures"]))
    return "\n".join(lines)


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6 if abs(x) < 0.01 else 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
