"""Runtime for an exported SO8T model folder: the four-class safety head and answers.

Shipped inside every export (and as the MLflow model's code), so it needs torch,
transformers and safetensors only — never so8t_exp. Usage::

    from so8t_safety_head import SO8TChat
    chat = SO8TChat("path/to/export")
    chat.classify(["How do I pick a lock?"])    # [("REFUSE", 0.91)]
    chat.answer(["How do I pick a lock?"], max_new_tokens=64)

The head reads the final hidden state (``output_hidden_states[-1]``) at the last token of
the chat template's generation prompt — where the answer starts — exactly as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

HEAD_WEIGHTS = "safety_head.safetensors"
HEAD_CONFIG = "safety_head.json"


class SafetyHead(nn.Module):
    """Linear (``hidden_dim`` 0) or one-hidden-layer classifier, float32."""

    def __init__(self, hidden_size: int, labels: list[str], hidden_dim: int, dropout: float):
        super().__init__()
        self.labels = labels
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        if hidden_dim:
            layers += [nn.Linear(hidden_size, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, len(labels)))
        else:
            layers.append(nn.Linear(hidden_size, len(labels)))
        self.net = nn.Sequential(*layers)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states.float())


def load_safety_head(folder: str | Path) -> SafetyHead | None:
    """The head saved beside an exported model, in eval mode; None if it has none."""
    folder = Path(folder)
    if not (folder / HEAD_CONFIG).is_file():
        return None
    spec = json.loads((folder / HEAD_CONFIG).read_text(encoding="utf-8"))
    head = SafetyHead(spec["hidden_size"], spec["labels"], spec["hidden_dim"], spec["dropout"])
    head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return head.eval()


class SO8TChat:
    """An exported SO8T model with its tokenizer (and chat template) and safety head."""

    def __init__(self, folder: str | Path, device: str = "cpu", dtype=None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.head = load_safety_head(folder)
        if self.head is not None:
            self.head.to(device)
        self.device = device

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """(1, n) token ids of the generation prompt for one user turn."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    @torch.no_grad()
    def classify(self, prompts: list[str]) -> list[tuple[str, float]]:
        """(label, probability) of the safety head for each prompt."""
        if self.head is None:
            raise ValueError("this export has no safety head")
        out = []
        for prompt in prompts:
            states = self.model(self.prompt_ids(prompt), output_hidden_states=True)
            probs = torch.softmax(self.head(states.hidden_states[-1][:, -1]), -1)[0]
            best = int(probs.argmax())
            out.append((self.head.labels[best], float(probs[best])))
        return out

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64) -> str:
        """The greedy answer to ``prompt``, up to the end of the assistant's turn."""
        ids = self.prompt_ids(prompt)
        out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    def answer(self, prompts: list[str], max_new_tokens: int = 64) -> list[dict]:
        """Answer and safety label of each prompt."""
        labels = self.classify(prompts) if self.head is not None else [(None, None)] * len(prompts)
        out = []
        for prompt, (label, confidence) in zip(prompts, labels, strict=True):
            answer = self.generate(prompt, max_new_tokens)
            out.append({"answer": answer, "safety_label": label, "safety_confidence": confidence})
        return out
