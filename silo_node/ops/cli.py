"""`silotune silo start`: join the federation from an institution (one SuperNode per silo)."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

from monitoring.cli import add_exporter_option
from silotune.errors import UserError
from silotune.flwr_connection import resolve_workspace

# SiloConfig fields offered as options (dashed); anything else goes through --node-config.
_SILO_OPTIONS = {
    "data-path": (str, "the silo's private data file (never leaves this machine)"),
    "domain": (str, "general | finance | medical | code (default: the run's)"),
    "name": (str, "this silo's name in metrics and logs"),
    "lora-rank": (int, "this silo's own LoRA rank (FlexLoRA)"),
    "columns": (str, "column mapping, e.g. 'instruction=question,output=answer'"),
    "label-map": (str, "label words, e.g. '0=negative,1=positive,2=neutral'"),
    "data-encoding": (str, "text encoding of the data file (default utf-8)"),
    "max-examples": (int, "use at most this many examples (0 = all)"),
    "eval-fraction": (float, "fraction held out for local evaluation"),
    "state-dir": (str, "where this silo writes its metric events"),
}
# Same tokenizer Flower uses for --node-config: key=value, value bare or quoted.
_PAIR_RE = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_node_config_text(text: str) -> dict[str, Any]:
    """Parse ``'k=v k2="v 2"'`` like Flower does (TOML values; bare words become strings)."""
    out: dict[str, Any] = {}
    for key, raw in _PAIR_RE.findall(text or ""):
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw  # bare word such as a path: keep it as a string
    return out


def _fingerprint_of_private(path: Path) -> str | None:
    from cryptography.hazmat.primitives import serialization

    from certs.node_key import ssh_fingerprint

    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return None
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return ssh_fingerprint(pub.decode())


def _start(args: argparse.Namespace) -> int:
    from monitoring.cli import parse_bind, supervise_with_exporter
    from silo_node.ops.clock_check import diagnose_clock
    from silo_node.ops.launch import SiloOptions, start_silo

    node_config = parse_node_config_text(args.node_config or "")
    for key in _SILO_OPTIONS:
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            node_config[key] = value
    if args.policy:
        node_config["policy-file"] = args.policy
    ws = resolve_workspace(args.workspace)
    opts = SiloOptions(
        superlink=args.superlink,
        node_config=node_config,
        ca_cert=Path(args.ca) if args.ca else None,
        node_key=Path(args.node_key) if args.node_key else None,
        insecure=args.insecure,
        runtime_port=args.runtime_port,
        executor=args.executor,
        threads=args.threads,
        gpus=args.gpus,
        events_dir=Path(args.events_dir) if args.events_dir else ws / "events",
        flwr_home=ws / "supernode" / "flwr-home",
    )
    if args.exporter:
        parse_bind(args.exporter)  # a bad address fails before the SuperNode starts
    if args.insecure:
        print("WARNING: --insecure: plaintext, no node authentication (development only)")
    log = Path(args.log_file) if args.log_file else None
    proc = start_silo(opts, log, run_domain=args.run_domain)
    print(f"SuperNode started for {args.superlink}" + (f"; log: {log}" if log else ""))
    rc = supervise_with_exporter(proc, args.exporter, opts.events_dir, "silo", ws / "exporter.log")
    if rc == 0 and not opts.insecure and opts.ca_cert is not None:
        # Exit code 0 without being asked to stop: the SuperLink refused a request with 401, which
        # the SuperNode does not log. A clock that drifted since the preflight is the usual cause.
        clock = diagnose_clock(args.superlink, opts.ca_cert)
        if clock:
            raise UserError(f"the SuperNode stopped: {clock}")
    if rc in (0, 130, 3, -15):
        return 0
    hint = f"the SuperNode stopped (exit code {rc})"
    fp = _fingerprint_of_private(Path(args.node_key)) if args.node_key else None
    raise UserError(
        f"{hint}. If its output shows 'Exit Code: 305' / 'Failed to activate SuperNode', the "
        "SuperLink refused this silo: ask the federation operator to admit your .pub"
        + (f" (fingerprint {fp})" if fp else "")
        + "; see docs/security.md#troubleshooting"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    silo = subparsers.add_parser("silo", help="run this institution's SuperNode")
    sub = silo.add_subparsers(dest="silo_command", metavar="ACTION", required=True)
    st = sub.add_parser("start", help="check data and settings, then start flower-supernode")
    st.add_argument("--superlink", required=True, help="SuperLink HOST:PORT (a name in its SANs)")
    st.add_argument("--ca", help="federation CA certificate (verifies the SuperLink)")
    st.add_argument("--node-key", help="this silo's private node key (silotune certs node-key)")
    st.add_argument("--insecure", action="store_true", help="plaintext, no node auth; development only")
    for key, (typ, help_text) in _SILO_OPTIONS.items():
        st.add_argument(f"--{key}", type=typ, default=None, help=help_text)
    st.add_argument("--node-config", help="extra node config 'key=value ...' (Flower syntax)")
    st.add_argument("--run-domain", default=None, help="domain the run uses (for the data check)")
    st.add_argument("--runtime-port", type=int, help="local Runtime API port (default 9094)")
    st.add_argument(
        "--executor",
        choices=("resident", "per-message"),
        default="resident",
        help="resident: one long-lived worker runs the installed SiloTune app and keeps the model "
        "loaded (docs/architecture.md); per-message: Flower's flower-superexec, a fresh "
        "flwr-clientapp per message, any app (no app pinning). Both authenticate to the local "
        "Runtime API with <state-dir>/superexec.secret (docs/security.md)",
    )
    st.add_argument("--threads", type=int, help="torch threads (default: CPU affinity / cgroup quota)")
    st.add_argument("--gpus", help="CUDA devices, e.g. '0,1' (default: the visible ones)")
    st.add_argument("--events-dir", help="SILOTUNE_EVENTS_DIR (default <workspace>/events)")
    st.add_argument("--log-file", help="write the SuperNode's output here instead of the terminal")
    st.add_argument("--workspace", help="SiloTune workspace (default ./.silotune)")
    add_exporter_option(st, "silo")
    st.add_argument(
        "--policy",
        help="this silo's policy file (TOML: allowed base models, limits, approval, federation CA; "
        "see docs/security.md#silo-policy). Default: embedded models only (no local directory or "
        "hub id unless allowed or listed), no remote code",
    )
    st.set_defaults(func=_start)
    ah = sub.add_parser("app-hash", help="print an app's FAB hash, for the policy's allowed-apps")
    ah.add_argument("app_dir", help="the Flower app's directory (with its pyproject.toml)")
    ah.set_defaults(func=_app_hash)
    sa = sub.add_parser(
        "start-adapter", help="print a PEFT adapter directory's digest, for peft.start-adapter and the policy"
    )
    sa.add_argument("adapter_dir", help="its directory (adapter_model.safetensors, adapter_config.json)")
    sa.set_defaults(func=_start_adapter)
    pp = sub.add_parser(
        "privacy-plan",
        help="what this silo's [privacy] policy does to a run's shape: noise, epsilon, and the same "
        "records in fewer, larger noisy steps (docs/privacy.md)",
    )
    pp.add_argument("--policy", required=True, help="this silo's policy file (with [privacy])")
    pp.add_argument("--records", type=int, required=True, help="training records in this silo's dataset")
    pp.add_argument("--rounds", type=int, required=True, help="the run's num-rounds")
    pp.add_argument("--local-steps", type=int, required=True, help="the run's train.local-steps")
    pp.add_argument("--batch-size", type=int, required=True, help="the run's train.batch-size")
    pp.add_argument("--grad-accum", type=int, default=1, help="the run's train.grad-accum (default 1)")
    pp.add_argument("--json", action="store_true", help="one JSON object a shape")
    pp.set_defaults(func=_privacy_plan)
    ap = sub.add_parser("approve", help="approve a run that waits at this silo (policy require-approval)")
    ap.add_argument("run_id", help="Flower's run id, as shown in the silo's log and `silotune silo audit`")
    ap.add_argument("--note", default="", help="a note kept in the audit log")
    _state_options(ap)
    ap.set_defaults(func=_approve)
    au = sub.add_parser("audit", help="print this silo's audit log (runs served, payloads sent, refusals)")
    au.add_argument("--json", action="store_true", help="one JSON object a line, as stored")
    _state_options(au)
    au.set_defaults(func=_audit)


def _state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="the silo's state dir (default <workspace>/supernode/state)")
    p.add_argument("--workspace", help="SiloTune workspace (default ./.silotune)")


def _state_dir(args: argparse.Namespace) -> Path:
    from silo_node.ops.launch import default_state_dir

    if args.state_dir:
        return Path(args.state_dir)
    return default_state_dir(resolve_workspace(args.workspace) / "supernode" / "flwr-home")


def _app_hash(args: argparse.Namespace) -> int:
    from silo_node.ops.pinning import flower_fab_hash

    app = Path(args.app_dir)
    if not (app / "pyproject.toml").is_file():
        raise UserError(f"{app} has no pyproject.toml: give the Flower app's directory")
    print(flower_fab_hash(app))
    return 0


def _start_adapter(args: argparse.Namespace) -> int:
    """The digest a run names in peft.start-adapter and the policy entry that lets it start here."""
    from silotune.adapters import load_adapter_dir, state_digest

    directory = Path(args.adapter_dir).expanduser().resolve()
    try:
        state, _ = load_adapter_dir(directory)
    except Exception as exc:  # missing files, unreadable safetensors or JSON
        raise UserError(f"{directory} is not a readable PEFT adapter directory: {exc}") from exc
    digest = state_digest(state)
    print(digest)
    print(f'# this silo\'s policy:\n[[start-adapters]]\nsha256 = "{digest}"\npath = "{directory}"')
    print(f'# the run config:\n"peft.start-adapter" = "{digest}"')
    return 0


def _privacy_plan(args: argparse.Namespace) -> int:
    """The noise and epsilon this silo's policy gives a run's shape, and larger-batch alternatives."""
    import dataclasses
    import json

    from silo_node.app.policy import load_policy
    from silo_node.ops.privacy_plan import plan_shapes

    policy = load_policy(args.policy).privacy
    if policy is None:
        raise UserError(f"{args.policy} has no [privacy] section: this silo trains without DP")
    try:
        rows = plan_shapes(
            policy, args.records, args.rounds, args.local_steps, args.batch_size, args.grad_accum
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        for r in rows:
            print(json.dumps(dataclasses.asdict(r), sort_keys=True))
        return 0
    source = (
        f"target-epsilon {policy.target_epsilon:g}"
        if policy.target_epsilon
        else f"noise-multiplier {policy.noise_multiplier:g}"
    )
    print(
        f"policy: {source}, delta {policy.delta:g}, max-grad-norm {policy.max_grad_norm:g}, "
        f"min-logical-batch {policy.min_logical_batch}, epsilon-budget {policy.epsilon_budget:g} "
        f"({policy.accountant} accountant)"
    )
    print(f"run: {args.records} records, {args.rounds} rounds; the first row is the run's shape")
    print(
        "logical batch  steps/round  records/round  q        sigma   epsilon(run)  noise/coord  signal/noise"
    )
    for r in rows:
        print(
            f"{r.logical_batch:>13}  {r.steps_per_round:>11}  {r.logical_batch * r.steps_per_round:>13}  "
            f"{r.sample_rate:<7.4f}  {r.noise_multiplier:<6.3f}  {r.epsilon_run:>12.3f}  "
            f"{r.noise_per_coordinate:>11.2e}  {r.signal_to_noise:>11.2f}x"
        )
    print(
        "epsilon(run): what this run alone spends (`silotune silo audit` shows what is spent already); "
        "signal/noise: sqrt(steps) x batch / sigma against the run's shape, if records' clipped "
        "gradients point alike (docs/privacy.md). A larger min-logical-batch in the policy raises "
        "the run's batch; the run's submitter sets its steps."
    )
    return 0


def _approve(args: argparse.Namespace) -> int:
    from silo_node.app.audit import approve_run

    path = approve_run(_state_dir(args), args.run_id, args.note)
    print(f"run {args.run_id} approved at this silo ({path}); it trains at the next round")
    return 0


def _audit(args: argparse.Namespace) -> int:
    import json
    import time

    from silo_node.app.audit import audit_path, read_audit

    state = _state_dir(args)
    if not audit_path(state).exists():
        raise UserError(f"no audit log at {audit_path(state)} (wrong --state-dir or --workspace?)")
    for entry in read_audit(state):
        if args.json:
            print(json.dumps(entry, sort_keys=True))
            continue
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.get("ts", 0)))
        rest = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("ts", "kind"))
        print(f"{ts}Z {entry.get('kind', '?'):<8} {rest}")
    _print_privacy(state, args.json)
    return 0


def _print_privacy(state: Path, as_json: bool) -> None:
    """Epsilon spent per dataset and per run, from the silo's privacy ledgers (silo_node/app/privacy.py)."""
    import json

    from silo_node.app.privacy import privacy_summary

    for ds in privacy_summary(state):
        if as_json:
            print(json.dumps({"kind": "privacy_summary", **ds}, sort_keys=True))
            continue
        spent = f"epsilon_spent={ds['epsilon_spent']:.4g} delta={ds['delta']:g}"
        print(f"privacy  dataset={ds['dataset']} {spent}")
        for run_id, r in ds["runs"].items():
            print(f"privacy    run_id={run_id} rounds={r['rounds']} epsilon={r['epsilon']:.4g}")
