"""The console progress bar (tqdm): step, loss and tokens/s (or the skipped-step count)."""

from __future__ import annotations

from tqdm.auto import tqdm


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )
        self.position = initial

    def update(self, step: int, metrics: dict[str, float]) -> None:
        # The postfix first: update() redraws, and must show this step's figures.
        if "train/loss" in metrics:
            self.bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}",
                tok_s=f"{metrics['train/tokens_per_sec']:.0f}",
                refresh=False,
            )
        else:  # a skipped (non-finite) step
            self.bar.set_postfix(skipped=int(metrics.get("train/skipped_steps", 0)), refresh=False)
        self.bar.update(step - self.position)
        self.position = step

    def close(self) -> None:
        self.bar.close()
