"""Local training: loss only on the response, FedProx's proximal term, adapters by method name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from silo_node.app.templates import get_template
from silo_node.app.training import IGNORE_INDEX, encode_example, proximal_term, train_round
from silotune.adapters import (
    adapter_state,
    attach_adapter,
    check_state_matches,
    from_array_record,
    load_adapter_state,
    to_array_record,
)
from silotune.config import ModelConfig, PeftSettings, TrainSettings
from silotune.modeling import load_model, model_identity
from tests.support.tiny_model import make_tiny_llama

RECORD = {"instruction": "", "input": "shares rose after strong earnings", "output": "positive"}


def test_only_response_tokens_carry_labels(tiny_model: Path) -> None:
    tok = load_model(ModelConfig(name=str(tiny_model)), for_training=False).tokenizer
    for chat in (True, False):
        enc = encode_example(tok, get_template("finance"), RECORD, 256, chat)
        labelled = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
        expected = tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labelled == expected
        n_prompt = enc.labels.index(expected[0])
        assert all(lab == IGNORE_INDEX for lab in enc.labels[:n_prompt])


def test_truncation_keeps_the_response(tiny_model: Path) -> None:
    tok = load_model(ModelConfig(name=str(tiny_model)), for_training=False).tokenizer
    long = dict(RECORD, input="word " * 400)
    enc = encode_example(tok, get_template("finance"), long, 32, True)
    assert len(enc.input_ids) == 32
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id


def test_chat_template_is_used_when_asked(tiny_model: Path) -> None:
    tok = load_model(ModelConfig(name=str(tiny_model)), for_training=False).tokenizer
    with_chat = encode_example(tok, get_template("finance"), RECORD, 256, True)
    without = encode_example(tok, get_template("finance"), RECORD, 256, False)
    assert tok.decode(with_chat.input_ids).startswith("<|im_start|>user")
    assert not tok.decode(without.input_ids).startswith("<|im_start|>")


def test_eval_prompt_style_trains_on_the_tokens_the_evaluator_reads(tiny_model: Path, tmp_path: Path) -> None:
    from evaluation.benchmarks.base import DataSource
    from evaluation.benchmarks.finance import load_tfns

    tok = load_model(ModelConfig(name=str(tiny_model)), for_training=False).tokenizer
    template = get_template("finance")
    answer = tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # The chat template is asked for but must not apply: the evaluator never uses one.
    enc = encode_example(tok, template, RECORD, 256, True, "eval")
    expected_prompt = f"Instruction: {template.default_instruction}\nInput: {RECORD['input']}\nAnswer: "
    assert enc.input_ids == tok(expected_prompt)["input_ids"] + answer
    assert enc.labels == [IGNORE_INDEX] * (len(enc.input_ids) - len(answer)) + answer
    # A TFNS benchmark item (its instruction says "tweet") asks with exactly the trained prompt tokens.
    (tmp_path / "tfns").mkdir()
    (tmp_path / "tfns" / "sent_valid.csv").write_text(f'text,label\n"{RECORD["input"]}",1\n')
    [item] = load_tfns(DataSource(root=tmp_path))
    tweet = dict(RECORD, instruction=item.prompt.split("\n")[0].removeprefix("Instruction: "))
    assert "tweet" in tweet["instruction"] and item.gold == "positive"
    trained = encode_example(tok, template, tweet, 256, False, "eval")
    assert trained.input_ids == tok(item.prompt)["input_ids"] + answer
    assert template.render(RECORD, "alpaca")[0].startswith("Below is an instruction")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_methods_by_name_train_and_ship_only_adapter_tensors(tiny_model: Path, method: str) -> None:
    loaded = load_model(ModelConfig(name=str(tiny_model)))
    peft = PeftSettings(method=method, rank=4, target_modules="q_proj,v_proj,down_proj")
    model = attach_adapter(loaded.model, peft)
    state = adapter_state(model)
    n_base = sum(p.numel() for n, p in model.named_parameters() if "base_layer" in n or "lora" not in n)
    assert 0 < sum(v.size for v in state.values()) < n_base  # adapter only, never the base
    marker = {"lora": "lora_", "dora": "lora_magnitude_vector", "ia3": "ia3_l"}[method]
    assert any(marker in k for k in state)
    enc = [encode_example(loaded.tokenizer, get_template("finance"), RECORD, 64, True)] * 4
    settings = TrainSettings(local_steps=2, batch_size=2)
    result = train_round(model, loaded.tokenizer, enc, settings, lr=1e-2, seed=0)
    assert result.tokens > 0 and result.examples == 4 and np.isfinite(result.train_loss)
    after = adapter_state(model)
    assert any(not np.array_equal(state[k], after[k]) for k in state)
    # The wire codec round-trips exactly.
    back = from_array_record(to_array_record(after))
    assert all(np.array_equal(back[k], after[k]) for k in after)


def test_proximal_term_is_zero_at_the_anchor_and_mu_zero_equals_fedavg_training(tiny_model: Path) -> None:
    def run(mu: float) -> dict[str, np.ndarray]:
        loaded = load_model(ModelConfig(name=str(tiny_model)))
        model = attach_adapter(loaded.model, PeftSettings(rank=4), seed=0)
        enc = [encode_example(loaded.tokenizer, get_template("finance"), RECORD, 64, True)] * 4
        anchor = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert float(proximal_term(model, anchor)) == 0.0
        train_round(
            model, loaded.tokenizer, enc, TrainSettings(local_steps=3, batch_size=2), 1e-2, 0, proximal_mu=mu
        )
        return adapter_state(model)

    plain, prox0, prox_big = run(0.0), run(0.0), run(50.0)
    assert all(np.array_equal(plain[k], prox0[k]) for k in plain)
    # A strong proximal term keeps the adapter closer to where it started (B starts at zero).
    b_keys = [k for k in plain if "lora_B" in k]
    assert sum(np.abs(prox_big[k]).sum() for k in b_keys) < sum(np.abs(plain[k]).sum() for k in b_keys)


def test_received_adapter_with_wrong_shape_is_refused(tiny_model: Path) -> None:
    loaded = load_model(ModelConfig(name=str(tiny_model)))
    model = attach_adapter(loaded.model, PeftSettings(rank=4))
    state = adapter_state(model)
    bad = {
        k: (np.zeros((v.shape[0] + 1, *v.shape[1:]), np.float32) if i == 0 else v)
        for i, (k, v) in enumerate(state.items())
    }
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_state(model, bad)
    nan = {k: np.full_like(v, np.nan) for k, v in state.items()}
    with pytest.raises(ValueError, match="NaN"):
        check_state_matches({k: v.shape for k, v in state.items()}, nan, "silo x")


def test_model_identity_changes_with_the_weights(tmp_path: Path, tiny_model: Path) -> None:
    a = model_identity(str(tiny_model))
    other = make_tiny_llama(tmp_path / "other", seed=1)
    b = model_identity(str(other))
    assert a.sha256 != b.sha256 and len(a.sha256) == 64
    assert model_identity(str(tiny_model)) == a


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_dtypes_load_and_run(tiny_model: Path, dtype: str) -> None:
    import torch

    loaded = load_model(ModelConfig(name=str(tiny_model), dtype=dtype, gradient_checkpointing=True))
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert next(loaded.model.parameters()).dtype == expected
    model = attach_adapter(loaded.model, PeftSettings(rank=2))
    enc = [encode_example(loaded.tokenizer, get_template("finance"), RECORD, 64, True)] * 2
    result = train_round(model, loaded.tokenizer, enc, TrainSettings(local_steps=1, batch_size=2), 1e-3, 0)
    assert np.isfinite(result.train_loss)


def test_pad_token_is_made_distinct_from_eos(tiny_model: Path) -> None:
    from silotune.modeling import choose_pad_token

    tok = load_model(ModelConfig(name=str(tiny_model)), for_training=False).tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    tok.pad_token = tok.eos_token  # as SmolLM2 ships it
    choose_pad_token(tok)
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == len(load_model(ModelConfig(name=str(tiny_model)), for_training=False).tokenizer)


def test_a_tiny_model_trained_a_few_steps_stops_after_its_answer(tiny_model: Path) -> None:
    """The finance recipe trains "<answer><EOS>" in the evaluation's prompt: generation then
    stops after the label instead of running on (the leaderboard's positive collapse)."""
    from evaluation.generation import greedy_generate

    loaded = load_model(ModelConfig(name=str(tiny_model)))
    model = attach_adapter(loaded.model, PeftSettings(rank=8, alpha=16, target_modules="all-linear"), 8, 0)
    template = get_template("finance")
    records = [
        dict(RECORD, input="shares rose after strong earnings", output="positive"),
        dict(RECORD, input="shares fell after weak guidance", output="negative"),
    ]
    examples = [encode_example(loaded.tokenizer, template, r, 64, False, "eval") for r in records]
    settings = TrainSettings(local_steps=60, batch_size=2, lr_max=2e-2)
    train_round(model, loaded.tokenizer, examples, settings, lr=2e-2, seed=0)
    model.eval()
    prompts = [template.render(r, "eval")[0] for r in records]
    budget = 12
    outs = greedy_generate(model, loaded.tokenizer, prompts, budget, batch_size=2)
    # Nothing after the label: EOS ended each answer well inside the budget of 12 tokens.
    assert all(o in ("positive", "negative") for o in outs), outs


def test_length_sorted_generation_answers_in_the_callers_order(tiny_model: Path) -> None:
    """greedy_generate batches prompts by length; each answer must still be the one that prompt
    gets on its own (batch of one), in the order the prompts were given."""
    from evaluation.generation import greedy_generate

    loaded = load_model(ModelConfig(name=str(tiny_model)), for_training=False)
    texts = ("the market rose on strong earnings", "shares fell after weak guidance", "def add(a, b): return")
    prompts = [texts[n % 3] * (n % 4 + 1) for n in (5, 1, 9, 3, 0, 7)]
    alone = [greedy_generate(loaded.model, loaded.tokenizer, [p], 6, batch_size=1)[0] for p in prompts]
    assert greedy_generate(loaded.model, loaded.tokenizer, prompts, 6, batch_size=4) == alone
    assert len(set(alone)) > 1  # distinct answers, so a reordering would show
