"""The training objective of one optimizer step, token-exact across micro-batches.

loss = Σ token losses / target tokens + w_pet · Σ PET terms / PET positions
       + w_head · Σ head losses / labelled examples,

each sum over *all* micro-batches of the step and each divided by its count over the whole
step, so ``micro_batch_size=2, grad_accum_steps=4`` computes the same gradient as
``micro_batch_size=8, grad_accum_steps=1`` (up to float rounding). Shared by the trainer,
evaluation and the benchmarks' reference loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from so8t_exp import so8t
from so8t_exp.chat import NO_CLASS
from so8t_exp.data import IGNORE_INDEX
from so8t_exp.safety_head import SafetyHead, last_prompt_states


@dataclass(frozen=True)
class Counts:
    """What the sums of one step (or one evaluation) are divided by."""

    tokens: int  # target tokens
    pet_positions: int
    labelled: int  # examples with a four-class label

    @classmethod
    def of(cls, batches: list[dict[str, torch.Tensor]]) -> Counts:
        """Counted on the (CPU) batches, before they go to the device: no sync."""
        tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        pet = sum(int(so8t.pet_mask(b["attention_mask"]).sum()) for b in batches)
        labelled = sum(int((b["class_label"] != NO_CLASS).sum()) for b in batches)
        return cls(tokens, pet, labelled)

    def divisors(self, device=None) -> torch.Tensor:
        """(3,) LM, PET, head divisors (never below 1), matching :meth:`Forward.sums`."""
        counts = [self.tokens, self.pet_positions, self.labelled]
        return torch.tensor([max(c, 1) for c in counts], dtype=torch.float32, device=device)


@dataclass
class Forward:
    """One micro-batch through the model and the head: summed losses (not yet divided)."""

    lm_sum: torch.Tensor  # Σ next-token cross-entropy over target tokens (float32)
    pet_sum: torch.Tensor  # Σ PET terms, averaged over adapters
    head_sum: torch.Tensor  # Σ head cross-entropy over labelled examples
    class_logits: torch.Tensor | None  # (batch, 4) float32, None without a head

    def loss(self, counts: Counts, pet_weight: float, head_weight: float) -> torch.Tensor:
        """This micro-batch's share of the step's loss (backward it, then the next one's)."""
        return (
            self.lm_sum / max(counts.tokens, 1)
            + pet_weight * self.pet_sum / max(counts.pet_positions, 1)
            + head_weight * self.head_sum / max(counts.labelled, 1)
        )

    def sums(self) -> torch.Tensor:
        """(3,) detached: LM, PET, head sums, for logging without a device sync."""
        return torch.stack([self.lm_sum, self.pet_sum, self.head_sum]).detach()


def forward(model, adapters, head: SafetyHead | None, batch: dict, autocast) -> Forward:
    """Run ``batch`` (on the model's device) through the model (under ``autocast``) and the
    head; the losses are sums, to be divided by the step's :class:`Counts`."""
    with autocast():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=head is not None,
        )
    lm_sum = lm_loss_sum(out.logits, batch["labels"])
    pet_sum = so8t.pet_sum(adapters, batch["attention_mask"])
    if head is None:
        return Forward(lm_sum, pet_sum, torch.zeros_like(lm_sum), None)
    states = last_prompt_states(out.hidden_states[-1], batch["prompt_len"])
    class_logits = head(states)
    head_sum = F.cross_entropy(
        class_logits, batch["class_label"], ignore_index=NO_CLASS, reduction="sum"
    )
    return Forward(lm_sum, pet_sum, head_sum, class_logits)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy of each target token given the tokens before it (float32).

    Labels are shifted by padding (as transformers does), so the logits are not copied."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        shifted.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
