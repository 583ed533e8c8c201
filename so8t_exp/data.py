"""JSONL instruction data: parsing, the train/validation split, batches and their order.

(Records become token ids in :mod:`so8t_exp.chat`.)

A record is ``{"instruction", "input", "output"}`` plus optional ``four_class_label``
(ALLOW, ESCALATION, DENY, REFUSE), ``domain_label`` and ``safety_label``. The order of the
training data is a pure function of (seed, epoch): the batch of any optimizer step is
found by index arithmetic, which is what lets a resumed run continue mid-epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from so8t_exp.config import ConfigError, DataConfig, check_data_file

log = logging.getLogger(__name__)

FOUR_CLASS_LABELS = ("ALLOW", "ESCALATION", "DENY", "REFUSE")
IGNORE_INDEX = -100
# Records are clipped to data.max_length × this many characters as they are read, so a
# huge record costs memory by the token budget, not by its size. No tokenizer has tokens
# this long (Phi-3.5: 16, the bundled one: 36), so a clipped answer is always too long.
CHARS_PER_TOKEN_BOUND = 64


class DataError(ValueError):
    """A malformed record; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    four_class_label: str | None = None
    domain_label: str | None = None
    safety_label: str | None = None
    output_clipped: bool = False  # the answer was cut short: too long to train on

    @property
    def prompt(self) -> str:
        return "\n\n".join(p for p in (self.instruction, self.input) if p)

    @property
    def text(self) -> str:
        return "\n\n".join(p for p in (self.instruction, self.input, self.output) if p)

    def clipped(self, max_chars: int) -> Record:
        """This record with its prompt cut to its last ``max_chars`` characters (as the
        prompt text) and its answer to ``max_chars`` (then marked clipped)."""
        prompt = self.prompt
        if len(prompt) <= max_chars and len(self.output) <= max_chars:
            return self
        return replace(
            self,
            instruction=prompt[-max_chars:],
            input="",
            output=self.output[:max_chars],
            output_clipped=self.output_clipped or len(self.output) > max_chars,
        )


def label_counts(records: list[Record]) -> str:
    """``ALLOW:9 ESCALATION:9 DENY:8 REFUSE:6`` (and ``none:N`` for unlabelled records)."""
    counts = Counter(r.four_class_label or "none" for r in records)
    return " ".join(f"{k}:{counts[k]}" for k in (*FOUR_CLASS_LABELS, "none") if counts[k])


@dataclass
class Dataset:
    train: list[Record]
    val: list[Record]
    skipped: int


def parse_record(line: str, where: str) -> Record:
    """One JSONL line as a :class:`Record`; :class:`DataError` names ``where`` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string")
    for key in ("input", "four_class_label", "domain_label", "safety_label"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise DataError(f"{where}: '{key}' must be a string")
    label = obj.get("four_class_label")
    if label is not None and label not in FOUR_CLASS_LABELS:
        raise DataError(f"{where}: four_class_label {label!r} not in {FOUR_CLASS_LABELS}")
    return Record(
        instruction=obj["instruction"].strip(),
        input=(obj.get("input") or "").strip(),
        output=obj["output"].strip(),
        four_class_label=label,
        domain_label=obj.get("domain_label"),
        safety_label=obj.get("safety_label"),
    )


def read_jsonl(path: Path, on_bad_record: str) -> tuple[list[Record], int]:
    """All records of one file, and how many bad lines were skipped."""
    records, skipped = [], 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # BOM: Windows
                if not line.strip():
                    continue
                records.append(parse_record(line, where))
            except (DataError, UnicodeDecodeError) as err:
                if isinstance(err, UnicodeDecodeError):
                    err = DataError(f"{where}: not UTF-8 (byte {err.start}); save as UTF-8")
                if on_bad_record != "skip":
                    raise err from None
                skipped += 1
                log.warning("skipped bad record: %s", err)
    return records, skipped


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read every file in ``data.files`` and split by a hash of each record's full text, so
    the split is stable whatever the file order and seed; records are clipped as read
    (:data:`CHARS_PER_TOKEN_BOUND`)."""
    train, val, skipped = [], [], 0
    max_chars = cfg.max_length * CHARS_PER_TOKEN_BOUND
    for i, name in enumerate(cfg.files):
        check_data_file(i, name)
        path = Path(name)
        got, bad = read_jsonl(path, cfg.on_bad_record)
        skipped += bad
        for rec in got:
            digest = hashlib.sha256(rec.text.encode("utf-8")).digest()
            is_val = int.from_bytes(digest[:8], "big") / 2**64 < cfg.val_fraction
            (val if is_val else train).append(rec.clipped(max_chars))
        del got  # (a huge record is freed before the next file is read)
    if not train and not val:
        raise ConfigError(f"data.files: no usable records in {list(cfg.files)}")
    if not train:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} leaves no training records")
    return Dataset(train=train, val=val, skipped=skipped)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples (:func:`so8t_exp.chat.encode`) into a batch:
    ids, loss labels, attention mask, and per row the prompt length and class target."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "prompt_len": torch.tensor([e["prompt_len"] for e in examples]),
        "class_label": torch.tensor([e["class_label"] for e in examples]),
    }


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The permutation of the training set in ``epoch``: a pure function of its arguments."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


class BatchPlan:
    """Maps an optimizer step to this rank's micro-batches (drop-last within each epoch).

    A step's batch is ``micro_batch × accum × world`` examples of the epoch's order; rank
    ``r`` takes every ``world``-th micro-batch of it from the ``r``-th on, so each rank's
    data is a pure function of (seed, epoch, step, rank, world)."""

    def __init__(
        self,
        examples: list[dict],
        micro_batch: int,
        accum: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.examples, self.micro_batch, self.accum = examples, micro_batch, accum
        self.seed, self.pad_id, self.rank, self.world = seed, pad_id, rank, world
        self.steps_per_epoch = len(examples) // (micro_batch * accum * world)
        if self.steps_per_epoch == 0:
            ranks = f" × {world} processes" if world > 1 else ""
            raise ConfigError(
                f"data.files: {len(examples)} training examples (records too long for "
                f"data.max_length are skipped) are fewer than one optimizer step "
                f"(trainer.micro_batch_size={micro_batch} × grad_accum_steps={accum}{ranks})"
            )
        self._order_epoch, self._order = -1, []

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, optimizer step within the epoch) of 0-based optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        epoch, index = self.position(step)
        if epoch != self._order_epoch:
            self._order_epoch, self._order = (
                epoch,
                epoch_order(self.seed, epoch, len(self.examples)),
            )
        first = index * self.accum * self.micro_batch * self.world
        out = []
        for j in range(self.accum):
            start = first + (j * self.world + self.rank) * self.micro_batch
            rows = self._order[start : start + self.micro_batch]
            out.append(collate([self.examples[i] for i in rows], self.pad_id))
        return out
