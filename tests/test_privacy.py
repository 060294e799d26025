"""Differential privacy at a silo (issue 24, items 1, 2 and 4): Opacus DP-SGD on the adapter, the
silo's own epsilon budget (ledger, refusal, audit), and where operators see it (events, Prometheus,
HTML report). Tiny random models; the central side runs on the scripted Grid."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from silo_node.app import client_app
from silo_node.app.audit import read_audit
from silo_node.app.policy import PolicyError, PrivacyPolicy, SiloPolicy, check_run, load_policy
from silo_node.app.privacy import (
    DPRound,
    Ledger,
    dataset_id,
    dp_step,
    dp_wrapped,
    epsilon_of,
    make_dp_optimizer,
    per_sample_loss,
    plan_round,
    privacy_summary,
    round_budget,
    train_round_dp,
)
from silotune import protocol as p
from silotune.config import ConfigError, SiloConfig, parse_run_config
from silotune.errors import PolicyRefused, PrivacyBudgetExhausted
from silotune.events import read_events
from silotune.silo_failures import SiloFailure, classify, describe_error, reason_for
from tests.support.scripted_grid import FakeGrid, FakeSilo, events_of, make_federation

REPO = Path(__file__).resolve().parents[1]
RUN_ID = 1  # the run id of conftest's flower_task_identity


# Messages need a Flower task identity (tests/conftest.py); its run id is the contexts' run id.
pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _policy(**kw: object) -> PrivacyPolicy:
    base: dict[str, object] = {
        "noise_multiplier": 1.1,
        "delta": 1e-5,
        "max_grad_norm": 1.0,
        "epsilon_budget": 8,
    }
    base.update(kw)
    return PrivacyPolicy(**base)


def load_policy_text(tmp_path: Path, extra: str) -> PrivacyPolicy:
    path = tmp_path / "policy.toml"
    path.write_text("[privacy]\nnoise-multiplier = 1\nepsilon-budget = 8\n" + extra)
    policy = load_policy(path).privacy
    assert policy is not None
    return policy


def _silo(tmp_path: Path, data: str = "rows.jsonl") -> SiloConfig:
    return SiloConfig(data_path=str(tmp_path / data), name="hospital-a", state_dir=str(tmp_path / "state"))


# -- the policy owns every privacy number ----------------------------------------------------------------
def test_policy_privacy_section_is_strict(tmp_path: Path) -> None:
    good = tmp_path / "p.toml"
    good.write_text("[privacy]\ntarget-epsilon = 3\ndelta = 1e-6\nmax-grad-norm = 0.5\nepsilon-budget = 8\n")
    pol = load_policy(good).privacy
    assert pol is not None and pol.target_epsilon == 3 and pol.max_grad_norm == 0.5 and pol.delta == 1e-6
    for text, match in [
        ("[privacy]\nepsilon-budget = 8\n", "exactly one of noise-multiplier"),
        ("[privacy]\nnoise-multiplier = 1\ntarget-epsilon = 2\nepsilon-budget = 8\n", "exactly one"),
        ("[privacy]\ntarget-epsilon = 9\nepsilon-budget = 8\n", "must not exceed"),
        ("[privacy]\nnoise-multiplier = 1\n", "epsilon-budget"),
        ("[privacy]\nnoise-multiplier = 1\nepsilon-budget = 8\nclip = 3\n", "clip"),
        ("[privacy]\nnoise-multiplier = 1\nepsilon-budget = 8\ndelta = 1.5\n", "delta"),
        ("[privacy]\nnoise-multiplier = 1\nepsilon-budget = 8\nmin-logical-batch = -1\n", "logical-batch"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(PolicyError, match=match):
            load_policy(bad)


def test_the_run_config_cannot_loosen_the_silos_privacy(tmp_path: Path) -> None:
    # The run config has no key for any privacy number: each is refused as unknown.
    for key, value in [("privacy.epsilon-budget", 1e9), ("privacy.noise-multiplier", 0.0),
                       ("dp.max-grad-norm", 1e9), ("privacy", False)]:  # fmt: skip
        with pytest.raises(ConfigError):
            parse_run_config({key: value})
    # What a run does set (batch, steps, rounds, the global clip) changes the cost, never the numbers.
    policy = _policy()
    loose = parse_run_config({"train.max-grad-norm": 1e9, "train.batch-size": 64, "train.local-steps": 50})
    plan = plan_round(policy, loose, n_examples=100)
    assert (plan.noise_multiplier, plan.max_grad_norm, plan.delta, plan.budget) == (1.1, 1.0, 1e-5, 8)
    assert plan.sample_rate == 0.64 and plan.steps == 50
    # ... and a costlier run is refused by the budget, not let through.
    (tmp_path / "rows.jsonl").write_text("")
    with pytest.raises(PrivacyBudgetExhausted, match="epsilon-budget is 8"):
        with round_budget(policy, loose, _silo(tmp_path), "1", 1, 100):
            raise AssertionError("trained past the budget")


def test_the_silo_owns_a_minimum_logical_batch(tmp_path: Path) -> None:
    # DP's noise on the averaged gradient is sigma x C / logical batch: the policy raises a small
    # run batch to its minimum (and the noise is calibrated at that sampling rate) ...
    policy = _policy(noise_multiplier=None, target_epsilon=8.0, min_logical_batch=64)
    small = parse_run_config({"train.batch-size": 8, "train.local-steps": 10, "num-rounds": 4})
    plan = plan_round(policy, small, n_examples=3000)
    assert plan.expected_batch_size == 64 and plan.sample_rate == pytest.approx(64 / 3000)
    whole_run = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 4
    assert epsilon_of(whole_run, 1e-5) == pytest.approx(8.0, abs=0.05)
    # ... a run's own larger logical batch stands, and a dataset smaller than the minimum is all of it.
    big = parse_run_config({"train.batch-size": 32, "train.grad-accum": 4, "train.local-steps": 10})
    assert plan_round(policy, big, n_examples=3000).expected_batch_size == 128
    tiny = plan_round(policy, small, n_examples=50)
    assert (tiny.sample_rate, tiny.expected_batch_size) == (1.0, 50)
    # The same plan as a run that accumulated to that batch itself (benchmarks/privacy.py's DP rows).
    accumulated = parse_run_config({"train.batch-size": 16, "train.grad-accum": 4, "train.local-steps": 10,
                                    "num-rounds": 4})  # fmt: skip
    by_run = plan_round(_policy(noise_multiplier=None, target_epsilon=8.0), accumulated, n_examples=3000)
    assert (by_run.noise_multiplier, by_run.sample_rate, by_run.expected_batch_size) == (
        plan.noise_multiplier, plan.sample_rate, plan.expected_batch_size)  # fmt: skip
    # Without the key the run's batch is what is sampled; and no run key can lower the policy's.
    assert plan_round(_policy(), small, n_examples=3000).expected_batch_size == 8
    with pytest.raises(ConfigError):
        parse_run_config({"privacy.min-logical-batch": 1})
    assert load_policy_text(tmp_path, "min-logical-batch = 64\n").min_logical_batch == 64


def test_a_raised_logical_batch_runs_in_the_runs_micro_batches(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory stays as the run set it: the policy's larger Poisson batch is processed in micro-batches
    # of train.batch-size (at q = 1 every record is drawn, so the count is exact).
    from silo_node.app import privacy
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_example
    from silotune.adapters import attach_adapter
    from silotune.config import ModelConfig, PeftSettings
    from silotune.modeling import load_model

    loaded = load_model(ModelConfig(name=str(tiny_model)))
    model = attach_adapter(loaded.model, PeftSettings(rank=2, dropout=0.0), seed=0)
    rows = [{"instruction": "", "input": f"item {i}", "output": ["up", "down"][i % 2]} for i in range(6)]
    examples = [encode_example(loaded.tokenizer, get_template("finance"), r, 32, True) for r in rows]
    run = parse_run_config({"train.batch-size": 2, "train.local-steps": 2, "train.seq-length": 32})
    plan = plan_round(_policy(min_logical_batch=6), run, n_examples=len(examples))  # q = 1: every record
    assert plan.expected_batch_size == 6
    sizes: list[int] = []
    real_collate = privacy.collate

    def counting(batch: list[object], pad: int) -> dict[str, object]:
        sizes.append(len(batch))
        return real_collate(batch, pad)

    monkeypatch.setattr(privacy, "collate", counting)
    privacy.train_round_dp(model, loaded.tokenizer, examples, run.train, lr=1e-3, seed=0, plan=plan)
    assert sizes == [2, 2, 2] * 2  # 2 steps x all 6 records, never more than 2 at once


# -- accounting --------------------------------------------------------------------------------------
def test_ledger_epsilon_equals_opacus_accountants_for_a_known_schedule(tmp_path: Path) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    (tmp_path / "rows.jsonl").write_text("")
    schedule = [("1", 1.1, 4, 200, 5), ("1", 1.1, 4, 200, 5), ("2", 0.9, 8, 200, 3), ("3", 1.3, 2, 50, 6)]
    rdp, prv = RDPAccountant(), PRVAccountant()
    for i, (run_id, sigma, batch, n, steps) in enumerate(schedule):
        run = parse_run_config({"train.batch-size": batch, "train.local-steps": steps})
        with round_budget(_policy(noise_multiplier=sigma, epsilon_budget=50), run, _silo(tmp_path), run_id,
                          i + 1, n) as plan:  # fmt: skip
            assert plan is not None
            plan.commit()
        for _ in range(steps):  # what Opacus's PrivacyEngine records: one step() per optimizer step
            rdp.step(noise_multiplier=sigma, sample_rate=batch / n)
            prv.step(noise_multiplier=sigma, sample_rate=batch / n)
        assert plan.spent_after == pytest.approx(rdp.get_epsilon(delta=1e-5), rel=1e-9)
    [summary] = privacy_summary(tmp_path / "state")
    assert summary["epsilon_spent"] == pytest.approx(rdp.get_epsilon(delta=1e-5), rel=1e-9)
    assert summary["runs"]["1"]["rounds"] == 2
    only_1 = RDPAccountant()
    for _ in range(10):
        only_1.step(noise_multiplier=1.1, sample_rate=4 / 200)
    assert summary["runs"]["1"]["epsilon"] == pytest.approx(only_1.get_epsilon(delta=1e-5), rel=1e-9)
    history = Ledger(tmp_path / "state", dataset_id(_policy(), _silo(tmp_path))).history()
    assert epsilon_of(history, 1e-5, "prv") == pytest.approx(prv.get_epsilon(delta=1e-5), abs=0.05)


def test_target_epsilon_calibrates_the_noise_to_the_runs_rounds() -> None:
    policy = _policy(noise_multiplier=None, target_epsilon=3.0)
    run = parse_run_config({"num-rounds": 4, "train.batch-size": 4, "train.local-steps": 5})
    plan = plan_round(policy, run, n_examples=100)
    whole_run = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 4
    assert epsilon_of(whole_run, 1e-5) == pytest.approx(3.0, abs=0.02)
    assert plan.spent_after < 3.0


# -- the budget is the silo's, on disk, across processes ------------------------------------------------
_CHILD = """
import sys
from pathlib import Path
from silo_node.app.policy import PrivacyPolicy
from silo_node.app.privacy import round_budget
from silotune.config import SiloConfig, parse_run_config
tmp = Path(sys.argv[1])
silo = SiloConfig(data_path=str(tmp / "rows.jsonl"), name="hospital-a", state_dir=str(tmp / "state"))
policy = PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=6.0)
run = parse_run_config({"train.batch-size": 10, "train.local-steps": 10})
with round_budget(policy, run, silo, sys.argv[2], int(sys.argv[3]), 100) as plan:
    plan.commit()
print(plan.spent_after)
"""


def test_the_budget_persists_across_processes_and_runs_then_refuses(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text("")

    def child(run_id: str, rnd: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), run_id, str(rnd)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    first = child("7", 1)  # a worker process: it spends, then exits
    assert first.returncode == 0, first.stderr
    eps1 = float(first.stdout.split()[-1])
    second = child("7", 2)  # the next round, another process (a restarted worker)
    eps2 = float(second.stdout.split()[-1])
    assert eps2 > eps1 > 0
    ledger = next((tmp_path / "state" / "privacy").glob("*.json"))
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.parent.stat().st_mode) == 0o700
    assert not list(ledger.parent.glob(".*.tmp"))  # written atomically, nothing left behind
    # A new run on the same data starts from what the silo has already spent.
    policy = PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=6.0)
    run = parse_run_config({"train.batch-size": 10, "train.local-steps": 10})
    with round_budget(policy, run, _silo(tmp_path), "8", 1, 100) as plan:
        assert plan is not None and plan.spent_before == pytest.approx(eps2) and plan.run_before == 0
    # Until a round would pass the budget: refused in another process too, nothing recorded.
    rounds = 2
    while True:
        res = child("8", rounds)
        if res.returncode != 0:
            break
        rounds += 1
        assert rounds < 50
    assert "PrivacyBudgetExhausted" in res.stderr and "epsilon-budget is 6" in res.stderr
    before = ledger.read_bytes()
    assert classify(PrivacyBudgetExhausted("x")) == SiloFailure.PRIVACY_BUDGET_EXHAUSTED
    refused = [e for e in read_audit(tmp_path / "state") if e["kind"] == "refused"]
    assert refused and refused[-1]["code"] == "PRIVACY_BUDGET_EXHAUSTED" and refused[-1]["run_id"] == "8"
    assert ledger.read_bytes() == before
    total = json.loads(ledger.read_text())
    assert max(r["epsilon_after"] for r in total["rounds"]) <= 6.0
    # `silotune silo audit` shows the epsilon spent per run.
    from command_line.main import main

    out = subprocess.run([sys.executable, "-c", "from command_line.main import main; import sys; "
                          f"sys.exit(main(['silo', 'audit', '--state-dir', {str(tmp_path / 'state')!r}]))"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "privacy    run_id=7 rounds=2" in out.stdout and "privacy    run_id=8" in out.stdout
    assert "epsilon_spent=" in out.stdout
    assert main is not None


# -- Opacus clips every record's gradient --------------------------------------------------------------
def test_each_records_gradient_is_clipped_by_opacus(tiny_model: Path) -> None:
    import torch

    from silo_node.app.templates import get_template
    from silo_node.app.training import collate, encode_example
    from silotune.adapters import attach_adapter
    from silotune.config import ModelConfig, PeftSettings
    from silotune.modeling import load_model

    loaded = load_model(ModelConfig(name=str(tiny_model)))
    model = attach_adapter(loaded.model, PeftSettings(rank=4, dropout=0.0), seed=0)
    model.train()
    tok = loaded.tokenizer
    rows = [{"instruction": "", "input": "w " * (3 * i + 1) + f"item {i}", "output": ["up", "down"][i % 2]}
            for i in range(6)]  # fmt: skip
    examples = [encode_example(tok, get_template("finance"), r, 48, True) for r in rows]
    params = [q for q in model.parameters() if q.requires_grad]
    with torch.no_grad():  # B = 0 would make every gradient of A zero: give B some weight
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.1)
    pad = tok.pad_token_id or 0

    # Each record's own gradient, one at a time, with plain autograd.
    per_record = []
    for e in examples:
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, collate([e], pad)).sum().backward()
        per_record.append(torch.cat([q.grad.flatten().clone() for q in params]))
    norms = torch.stack([g.norm() for g in per_record])
    model.zero_grad(set_to_none=True)

    def private_gradient(clip: float, micro: int) -> torch.Tensor:
        plan = DPRound(noise_multiplier=0.0, sample_rate=1.0, steps=1, expected_batch_size=len(examples),
                       max_grad_norm=clip, delta=1e-5, budget=1.0)  # fmt: skip
        with dp_wrapped(model) as gsm:
            opt = make_dp_optimizer(torch.optim.SGD(params, lr=0.0), plan, torch.device("cpu"))
            dp_step(gsm, opt, examples, list(range(len(examples))), micro, pad, torch.device("cpu"))
            grad = torch.cat([q.grad.flatten().clone() for q in params])
            opt.zero_grad(set_to_none=True)
        return grad

    clip = float(norms.min()) / 4  # every record is far above the bound
    got = private_gradient(clip, micro=4)  # two micro-batches (4 + 2), one Poisson batch
    want = sum(g * (clip / (g.norm() + 1e-6)) for g in per_record) / len(examples)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    # The bound holds per record: no record contributes more than `clip` to the sum.
    assert float(got.norm()) * len(examples) <= clip * len(examples) * (1 + 1e-5)
    # A loose bound clips nothing: the mean of the records' own gradients.
    loose = private_gradient(float(norms.max()) * 10, micro=6)
    assert torch.allclose(loose, torch.stack(per_record).mean(0), rtol=1e-4, atol=1e-7)
    # The hooks are gone afterwards: the resident worker's next round sees the plain model.
    assert not any(hasattr(q, "grad_sample") for q in params)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


# -- the ClientApp: DP rounds, then a refusal with its code --------------------------------------------
def _context(tmp_path: Path, model: Path, policy: Path, **run: object) -> Context:
    data = tmp_path / "silo.jsonl"
    rows = [
        {"text": f"Company {i} shares {'rose' if i % 2 else 'fell'}", "label": "positive"} for i in range(16)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    node = {"data-path": str(data), "name": "hospital-a", "columns": "input=text,output=label",
            "state-dir": str(tmp_path / "state"), "policy-file": str(policy)}  # fmt: skip
    cfg = {"model.name": str(model), "peft.rank": 2, "train.batch-size": 4, "train.local-steps": 2,
           "train.seq-length": 48, "num-rounds": 5, **run}  # fmt: skip
    return Context(RUN_ID, 7, node, RecordDict(), cfg)


def _msg(kind: str, content: RecordDict) -> Message:
    msg = Message(content=content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m-1"
    return msg


def test_clientapp_trains_with_dp_reports_epsilon_then_refuses_past_its_budget(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SILOTUNE_EVENTS_DIR", str(tmp_path / "events"))
    policy = tmp_path / "policy.toml"
    policy.write_text(
        "allow-local-paths = true\n"
        "[privacy]\nnoise-multiplier = 2.0\nmax-grad-norm = 0.5\nepsilon-budget = 1.9\n"
    )
    ctx = _context(tmp_path, tiny_model, policy)
    hello = client_app.handshake(
        _msg(MessageType.QUERY, RecordDict({"config": ConfigRecord({"want-init": True})})), ctx
    )
    assert not hello.has_error(), hello.error if hello.has_error() else ""
    arrays = hello.content["arrays"]
    spent = []
    for rnd in range(1, 10):
        cfg = ConfigRecord({"server-round": rnd, "lr": 1e-2})
        reply = client_app.train(_msg(MessageType.TRAIN, RecordDict({"config": cfg, "arrays": arrays})), ctx)
        if reply.has_error():
            break
        m = reply.content["metrics"]
        assert m[p.metric_key(p.DP_EPSILON_BUDGET)] == 1.9 and m[p.metric_key(p.DP_NOISE_MULTIPLIER)] == 2.0
        spent.append(m[p.metric_key(p.DP_EPSILON_SPENT)])
        arrays = reply.content["arrays"]
    assert len(spent) == 3 and spent == sorted(spent) and spent[-1] <= 1.9
    assert reply.error.code == SiloFailure.PRIVACY_BUDGET_EXHAUSTED
    assert reply.error.reason == reason_for(SiloFailure.PRIVACY_BUDGET_EXHAUSTED)  # fixed text only
    assert "hospital" not in reply.error.reason and "silo.jsonl" not in reply.error.reason
    local = [e for e in read_events(tmp_path / "state" / "silo.jsonl") if e["kind"] == p.EV_LOCAL_TRAIN]
    assert [e[p.DP_EPSILON_SPENT] for e in local] == spent
    assert all(e[p.DP_EPSILON_RUN] == e[p.DP_EPSILON_SPENT] for e in local)  # the dataset's first run
    audit = list(read_audit(tmp_path / "state"))
    assert [e["round"] for e in audit if e["kind"] == "privacy"] == list(range(1, len(spent) + 1))
    assert any(e["kind"] == "refused" and e.get("code") == "PRIVACY_BUDGET_EXHAUSTED" for e in audit)
    assert os.path.exists(tmp_path / "state" / "privacy")


def test_gradient_checkpointing_is_refused_under_dp(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text("")
    run = parse_run_config({"model.gradient-checkpointing": True})
    with pytest.raises(Exception, match="gradient checkpointing") as err:
        with round_budget(_policy(), run, _silo(tmp_path), "1", 1, 100):
            pass
    assert classify(err.value) == SiloFailure.POLICY_REFUSED


# -- the central site: records the code, goes on with the others; epsilon in events, Prometheus, report ----
class BudgetSilo(FakeSilo):
    """Reports epsilon like a DP silo, and refuses (PRIVACY_BUDGET_EXHAUSTED) from round ``last + 1``."""

    def __init__(self, name: str, last: int) -> None:
        super().__init__(name)
        self.last, self.round = last, 0

    def reply(self, msg: Message) -> RecordDict:
        content = super().reply(msg)
        if msg.metadata.message_type == "train":
            self.round += 1
            eps = 0.45 * self.round
            content["metrics"][p.metric_key(p.DP_EPSILON_SPENT)] = eps
            content["metrics"][p.metric_key(p.DP_EPSILON_BUDGET)] = 1.0
            content["metrics"][p.metric_key(p.DP_EPSILON_RUN)] = eps
        return content


class BudgetGrid(FakeGrid):
    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for i, m in enumerate(messages):
            nid = m.metadata.dst_node_id
            silo = self.silos[nid]
            if (m.metadata.message_type == "train" and isinstance(silo, BudgetSilo)
                    and silo.round >= silo.last):  # fmt: skip
                mid = f"{len(self.outbox)}-b{i}"
                m.metadata.__dict__["_message_id"] = mid
                code = SiloFailure.PRIVACY_BUDGET_EXHAUSTED
                reply = Message(Error(code=int(code), reason="dataset /secret/path spent"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = nid
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self.outbox[mid] = reply
                ids.append(mid)
            else:
                ids += list(super().push_messages([m]))
        return ids


def test_a_silo_out_of_budget_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    from monitoring.exporter import FederationState
    from monitoring.report import write_report
    from silotune import metrics as m

    grid = BudgetGrid({1: FakeSilo("a"), 2: FakeSilo("b"), 3: BudgetSilo("hospital", last=2)})
    fed = make_federation(tmp_path, grid, **{"num-rounds": 4, "strategy.min-answers": 1})
    fed.run()
    assert len(events_of(tmp_path, p.EV_ROUND_END)) == 4  # every round, with the others
    failed = events_of(tmp_path, p.EV_SILO_FAILED)
    assert [(e["silo"], e["round"], e["code"]) for e in failed] == [
        ("hospital", 3, "PRIVACY_BUDGET_EXHAUSTED"), ("hospital", 4, "PRIVACY_BUDGET_EXHAUSTED")]  # fmt: skip
    assert all("/secret" not in e["reason"] for e in failed)
    assert describe_error(int(SiloFailure.PRIVACY_BUDGET_EXHAUSTED), "x").startswith(
        "PRIVACY_BUDGET_EXHAUSTED"
    )
    results = {(e["silo"], e["round"]): e for e in events_of(tmp_path, p.EV_SILO_RESULT)}
    assert results[("hospital", 2)][p.DP_EPSILON_SPENT] == pytest.approx(0.9)
    assert results[("hospital", 2)][p.DP_EPSILON_BUDGET] == 1.0
    assert p.DP_EPSILON_SPENT not in results[("a", 2)]  # a silo without DP reports none
    # Prometheus: a gauge per DP silo (the 80% alert reads it: monitoring/prometheus/rules).
    state = FederationState()
    for e in read_events(tmp_path / "run" / "events.jsonl"):
        state.apply(e)
    assert state.gauges[m.SILO_DP_EPSILON_SPENT.name] == {("hospital",): pytest.approx(0.9)}
    assert state.gauges[m.SILO_DP_EPSILON_BUDGET.name] == {("hospital",): 1.0}
    # The HTML report: a privacy table and chart.
    html = write_report(tmp_path / "run").read_text()
    assert "epsilon spent" in html and "Privacy: epsilon spent per silo" in html and "90.00%" in html


def test_report_and_exporter_without_dp_show_nothing_about_it(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from monitoring.exporter import build_registry
    from monitoring.report import write_report
    from silotune import metrics as m

    grid = FakeGrid({1: FakeSilo("a"), 2: FakeSilo("b")})
    make_federation(tmp_path, grid).run()
    html = write_report(tmp_path / "run").read_text()
    assert "epsilon" not in html
    # What a Prometheus scrape of the exporter returns: the run's series, none of them DP's.
    registry, _ = build_registry(tmp_path / "run" / "events.jsonl", "superlink", 0.0)
    scraped = generate_latest(registry).decode()
    assert m.SILO_ROUNDS.name in scraped  # the events were read
    assert "silotune_silo_dp_" not in scraped and "epsilon" not in scraped


# -- what DP-SGD can train: LoRA and QLoRA, at fp32 and bf16; DoRA and IA3 refused when the run starts --
@pytest.mark.parametrize("cfg", [{"model.dtype": "bf16"}, {"peft.method": "qlora"}], ids=["bf16", "qlora"])
def test_a_dp_round_trains_a_bf16_model_and_qlora(tiny_model: Path, cfg: dict[str, object]) -> None:
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_example
    from silotune.adapters import adapter_state, attach_adapter
    from silotune.modeling import load_model

    run = parse_run_config({"model.name": str(tiny_model), "train.batch-size": 2, "train.local-steps": 2,
                            "train.seq-length": 32, **cfg})  # fmt: skip
    loaded = load_model(run.model)
    model = attach_adapter(loaded.model, run.peft, seed=0)
    rows = [{"instruction": "", "input": f"item {i}", "output": ["up", "down"][i % 2]} for i in range(6)]
    examples = [encode_example(loaded.tokenizer, get_template("finance"), r, 32, True) for r in rows]
    plan = plan_round(_policy(min_logical_batch=6), run, n_examples=len(examples))  # q = 1: a full batch
    before = adapter_state(model)
    res = train_round_dp(model, loaded.tokenizer, examples, run.train, lr=1e-2, seed=0, plan=plan)
    after = adapter_state(model)
    assert math.isfinite(res.train_loss)
    assert all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in after)  # the noisy steps moved it


@pytest.mark.parametrize(
    ("cfg", "why"),
    [({"peft.method": "dora"}, "'dora'"), ({"peft.method": "ia3"}, "'ia3'"),
     ({"model.gradient-checkpointing": True}, "gradient checkpointing")],
)  # fmt: skip
def test_a_dp_silo_refuses_what_opacus_cannot_train_when_the_run_starts(
    cfg: dict[str, object], why: str
) -> None:
    run = parse_run_config(cfg)
    dp = SiloPolicy.model_validate({"privacy": {"noise-multiplier": 1.0, "epsilon-budget": 8}})
    with pytest.raises(PolicyRefused, match=why):
        check_run(dp, run)  # the handshake's gate, before any model loads
    check_run(SiloPolicy(), run)  # a silo without [privacy] trains it
    check_run(dp, parse_run_config({"peft.method": "qlora"}))
