"""The local training loop of one round at a silo: response-only loss, optional FedProx term.

A plain loop instead of ``transformers.Trainer``: Flower starts a fresh process per round, and the
Trainer's start-up cost dominates short rounds on CPU. The loop does exactly what FlowerTune's
trainer does for a round (fixed number of optimizer steps, constant LR given by the server's cosine
schedule, fresh AdamW state), plus the numbers operators need: tokens, throughput, wall time. With
``train.keep-optimizer-state`` the round starts from the AdamW state the silo kept from its last
round instead, and hands back the new one (``silo_node/app/optimizer_state.py``).
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any

from silo_node.app.optimizer_state import OptimizerState, apply_state, export_state
from silo_node.app.templates import DomainTemplate
from silotune.config import PromptStyle, TrainSettings
from silotune.errors import NoLearningError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TrainResult:
    train_loss: float
    examples: int  # size of the silo's training set (FedAvg weight, as in FlowerTune)
    tokens: int  # non-padding tokens processed this round
    tokens_per_second: float
    train_seconds: float
    steps: int
    # AdamW's state after the round, by parameter name (train.keep-optimizer-state; else None).
    # It stays at the silo: the ClientApp keeps it in its state dir and never puts it in a reply.
    optimizer_state: OptimizerState | None = None


def build_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> str:
    """Wrap the domain prompt in the model's chat template when it has one and it is wanted."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def encode_example(
    tokenizer: Any,
    template: DomainTemplate,
    record: dict[str, str],
    seq_length: int,
    use_chat_template: bool,
    style: PromptStyle = "alpaca",
) -> Encoded:
    """Tokenize prompt and response separately so the loss mask falls exactly on the response.

    The ``eval`` style is FlowerTune's evaluation prompt verbatim, so it never takes a chat template.
    """
    prompt, response = template.render(record, style)
    text = build_prompt(tokenizer, prompt, use_chat_template and style == "alpaca")
    chat = text != prompt
    prompt_ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    resp_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        resp_ids = resp_ids + [tokenizer.eos_token_id]
    resp_ids = resp_ids[: seq_length - 1] if len(resp_ids) >= seq_length else resp_ids
    room = seq_length - len(resp_ids)
    if len(prompt_ids) > room:
        # Keep the end of the prompt (the instruction's question and the "### Response:" cue).
        prompt_ids = prompt_ids[len(prompt_ids) - room :]
    return Encoded(prompt_ids + resp_ids, [IGNORE_INDEX] * len(prompt_ids) + resp_ids)


def encode_records(
    tokenizer: Any,
    template: DomainTemplate,
    records: list[dict[str, str]],
    seq_length: int,
    use_chat_template: bool,
    style: PromptStyle = "alpaca",
) -> list[Encoded]:
    return [encode_example(tokenizer, template, r, seq_length, use_chat_template, style) for r in records]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _Sampler:
    """Epoch-wise shuffling with a seeded RNG: every example is seen before any repeats."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


def proximal_term(model: Any, anchor: dict[str, Any]) -> Any:
    """FedProx: sum of squared distances of trainable parameters to the received global ones."""
    total = None
    for name, p in model.named_parameters():
        if p.requires_grad and name in anchor:
            d = (p.float() - anchor[name]).pow(2).sum()
            total = d if total is None else total + d
    return total


# One optimizer step's gradients: (the step's loss, or None when no record was drawn; its tokens).
Backward = Callable[[int], tuple[float | None, int]]


def train_round(
    model: Any,
    tokenizer: Any,
    examples: list[Encoded],
    settings: TrainSettings,
    lr: float,
    seed: int,
    proximal_mu: float = 0.0,
    progress: Any = None,
    optimizer_state: OptimizerState | None = None,
) -> TrainResult:
    """Run ``settings.local_steps`` optimizer steps on ``examples``; return what happened.

    ``optimizer_state`` (a previous round's ``TrainResult.optimizer_state``) starts AdamW from
    that state, at this round's ``lr``; one that does not fit this adapter is ignored with a
    warning. With ``settings.keep_optimizer_state`` the result carries the state after the round.
    DP-SGD (``silo_node.app.privacy.train_round_dp``) runs the same steps with private gradients.
    """
    if not examples:
        raise ValueError("no training examples")
    device = next(p.device for p in model.parameters())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    anchor = {n: p.detach().float().clone() for n, p in named}
    sampler = _Sampler(len(examples), seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def backward(step: int) -> tuple[float | None, int]:
        step_loss, tokens = 0.0, 0
        for _ in range(settings.grad_accum):
            batch = collate([examples[i] for i in sampler.take(settings.batch_size)], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            out = model(**batch)
            loss = out.loss / settings.grad_accum
            if proximal_mu > 0:
                loss = loss + (proximal_mu / 2.0) * proximal_term(model, anchor) / settings.grad_accum
            loss.backward()
            step_loss += float(out.loss.detach()) / settings.grad_accum
        return step_loss, tokens

    opt = make_optimizer(named, settings, lr, optimizer_state, seed)
    steps = range(settings.local_steps)
    return run_steps(model, named, opt, anchor, steps, backward, settings, lr, len(examples), progress)


def make_optimizer(
    named: list[tuple[str, Any]],
    settings: TrainSettings,
    lr: float,
    optimizer_state: OptimizerState | None,
    seed: int,
) -> Any:
    """AdamW on the trainable parameters, from a kept state when there is one (seeds dropout)."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=settings.weight_decay)
    if optimizer_state:
        apply_state(opt, named, optimizer_state, lr)
    return opt


def run_steps(
    model: Any,
    named: list[tuple[str, Any]],
    opt: Any,
    anchor: dict[str, Any],
    steps: Iterable[Any],
    backward: Callable[[Any], tuple[float | None, int]],
    settings: TrainSettings,
    lr: float,
    num_examples: int,
    progress: Any = None,
    max_grad_norm: float | None = None,
) -> TrainResult:
    """The local steps: ``backward(step)`` leaves each step's gradient in ``p.grad``; here it is
    clipped to ``max_grad_norm`` (default train.max-grad-norm; inf: measured only), checked and
    applied. A step on inf/NaN gradients would write NaN into the adapter: it is skipped and counted.
    Ends with the guard that refuses a round that changed nothing (``check_round_learned``)."""
    import torch

    model.train()
    params = [p for _, p in named]
    clip = settings.max_grad_norm if max_grad_norm is None else max_grad_norm
    losses: list[float] = []
    tokens = taken = zero_grad_steps = nonfinite_grad_steps = 0
    planned = len(steps) if isinstance(steps, Sized) else None
    start = time.perf_counter()
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss, n_tokens = backward(step)
        tokens += n_tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if not math.isfinite(grad_norm):
            nonfinite_grad_steps += 1
        else:
            zero_grad_steps += grad_norm == 0.0
            opt.step()
        taken += 1
        if loss is not None:
            losses.append(loss)
        if progress is not None:
            progress(taken, planned or taken, loss if loss is not None else 0.0)
    wall = time.perf_counter() - start
    mean_loss = float(sum(losses) / len(losses)) if losses else 0.0
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"training loss is {mean_loss}; lower train.lr-max")
    check_round_learned(model, anchor, taken, zero_grad_steps, nonfinite_grad_steps, lr)
    return TrainResult(
        train_loss=mean_loss,
        examples=num_examples,
        tokens=tokens,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        train_seconds=wall,
        steps=taken,
        optimizer_state=export_state(opt, named) if settings.keep_optimizer_state else None,
    )


def round_seed(base_seed: int, silo_name: str, server_round: int) -> int:
    """The seed of a silo's round: the ClientApp and compare's in-process federation both use it.

    Different silos must not draw identical batches, and the same silo must draw the same ones when
    a round is replayed: crc32 of the name is stable across processes (``hash()`` is salted).
    """
    return base_seed + 1000 * server_round + zlib.crc32(silo_name.encode()) % 1000


def check_round_learned(
    model: Any,
    before: dict[str, Any],
    steps: int,
    zero_grad_steps: int,
    nonfinite_grad_steps: int,
    lr: float,
) -> None:
    """Raise :class:`NoLearningError` if the round cannot have taught the adapter anything.

    Checked on what actually happened, not on the loss: a broken kernel (see
    ``silotune.modeling.keep_4bit_layers_trainable``) or a zero learning rate still yields a
    plausible loss, and the unchanged adapter would go back to the server as if it had trained.
    """
    if nonfinite_grad_steps == steps:
        raise NoLearningError(
            f"round learned nothing: the gradients were non-finite in all {steps} steps "
            "(every step was skipped); lower train.lr-max or check the data"
        )
    if zero_grad_steps + nonfinite_grad_steps == steps:
        raise NoLearningError(
            f"round learned nothing: every gradient was exactly zero in all {steps} steps "
            f"({nonfinite_grad_steps} non-finite); no gradient reaches the adapter, which points "
            "to the model's kernels (e.g. a bitsandbytes layer without autograd), not to the data"
        )
    changed = any(
        not bool(p.detach().float().eq(before[name]).all())
        for name, p in model.named_parameters()
        if p.requires_grad and name in before
    )
    if not changed:
        raise NoLearningError(
            f"round learned nothing: no trainable parameter changed in {steps} steps "
            f"(learning rate {lr:g}); check train.lr-max / train.lr-min"
        )


def evaluate_loss(model: Any, tokenizer: Any, examples: list[Encoded], batch_size: int) -> float:
    """Mean response-only loss over ``examples`` (no gradient)."""
    import torch

    device = next(p.device for p in model.parameters())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            n_tok = int((batch["labels"] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n_tok
            count += n_tok
    return total / max(count, 1)
