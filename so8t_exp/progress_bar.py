"""The console progress bar (tqdm): step, loss and tokens/s."""

from __future__ import annotations

from tqdm.auto import tqdm


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )
        self.position = initial

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(step - self.position)
        self.position = step
        self.bar.set_postfix(
            loss=f"{metrics['train/loss']:.4f}",
            tok_s=f"{metrics['train/tokens_per_sec']:.0f}",
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()
