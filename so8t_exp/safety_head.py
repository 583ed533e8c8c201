"""The four-class safety head: ALLOW / ESCALATION / DENY / REFUSE from the model's state.

As in the SO8T model, a small classifier reads the final hidden state (after the last norm)
at the last prompt token — the position where the answer is about to start — and is trained
jointly with the language-model loss. It is a submodule of the model
(``so8t_safety_head``), so its weights travel with the trainable state: checkpoints, exact
resume, the final model. It runs in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from so8t_exp.config import SafetyHeadConfig
from so8t_exp.data import FOUR_CLASS_LABELS

ATTRIBUTE = "so8t_safety_head"


class SafetyHead(nn.Module):
    """Linear (``hidden_dim=0``) or one-hidden-layer classifier over ``len(classes)``."""

    def __init__(self, hidden_size: int, hidden_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        n = len(FOUR_CLASS_LABELS)
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        if hidden_dim:
            layers += [nn.Linear(hidden_size, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, n)]
        else:
            layers.append(nn.Linear(hidden_size, n))
        self.net = nn.Sequential(*layers)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) states of the last prompt token -> (batch, 4) float32 logits."""
        with torch.autocast(states.device.type, enabled=False):
            return self.net(states.float())


def attach_safety_head(model: nn.Module, cfg: SafetyHeadConfig) -> SafetyHead | None:
    """Create the head (seeded by the global RNG, like the adapters) as a submodule of
    ``model``; None when ``cfg.enabled`` is false."""
    if not cfg.enabled:
        return None
    hidden = model.config.hidden_size
    head = SafetyHead(hidden, cfg.hidden_dim, cfg.dropout)
    head.to(next(model.parameters()).device)
    setattr(model, ATTRIBUTE, head)
    return head


def last_prompt_states(hidden: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """The rows of ``hidden`` (batch, seq, dim) at each example's last prompt token."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, prompt_len.to(hidden.device) - 1]
