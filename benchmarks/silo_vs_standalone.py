"""What the resident silo worker costs against a plain transformers+peft loop: peak RSS, tokens/s.

Two fresh processes, same model (SmolLM2-135M, embedded:smollm2-135m-instruct), LoRA config, data,
threads and number of optimizer steps:
- "silo": the SiloTune ClientApp's train handler as the resident worker runs it (silo_node/
  resident.py caches, policy gate, adapter swap, reply records), called once per round;
- "standalone": the loop below, transformers + peft + AdamW and nothing else.
Peak RSS is the process's ru_maxrss; tokens/s counts non-padding tokens over training wall time.
Prints figures, then one JSON line. Run: python benchmarks/silo_vs_standalone.py --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "embedded:smollm2-135m-instruct"


def _settings(quick: bool) -> dict:
    if quick:
        return {"rounds": 2, "steps": 3, "batch": 4, "seq": 128}
    return {"rounds": 5, "steps": 10, "batch": 4, "seq": 256}


def _run_config(s: dict) -> dict:
    return {
        "model.name": MODEL, "train.local-steps": s["steps"], "train.batch-size": s["batch"],
        "train.seq-length": s["seq"], "train.lr-max": 1e-3, "domain": "finance",
    }  # fmt: skip


def _silo(s: dict, data: Path) -> dict:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from silo_node.app import resident
    from silo_node.app.client_app import train
    from silotune.adapters import to_array_record
    from silotune.config import parse_run_config
    from silotune.wire_codec import encode, encoding_for

    resident.RESIDENT = True
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    run = parse_run_config(_run_config(s))
    init = resident.model_with_adapter(run.model, run.peft, run.peft.rank, run.train.seed).init_state
    arrays = to_array_record(encode(init, encoding_for(run.transport)))  # as the server sends it
    node_config = {"data-path": str(data), "name": "bench"}
    tokens, seconds = 0, 0.0
    for rnd in range(1, s["rounds"] + 1):
        ctx = Context(1, 1, node_config, RecordDict(), _run_config(s))
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd, "lr": 1e-3})})
        reply = train(Message(content, dst_node_id=1, message_type="train"), ctx)
        if reply.has_error():
            raise RuntimeError(f"silo round failed: {reply.error.reason}")
        arrays = reply.content["arrays"]
        m = reply.content["metrics"]
        tokens += int(m["tokens"])
        seconds += float(m["train-seconds"])
    return {"tokens": tokens, "train_seconds": seconds}


def _standalone(s: dict, data: Path) -> dict:
    """The baseline: the same model files, tokenizer, LoRA and examples; a bare training loop."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from silo_node.app.data import load_silo_records, split_train_eval
    from silo_node.app.templates import get_template
    from silo_node.app.training import collate, encode_records
    from silotune.config import parse_run_config, parse_silo_config
    from silotune.modeling import _gguf_cache_dir, resolve_source

    run = parse_run_config(_run_config(s))
    path = _gguf_cache_dir(resolve_source(MODEL))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=run.peft.rank, lora_alpha=run.peft.alpha,
                     lora_dropout=run.peft.dropout, target_modules=run.peft.target_module_list)  # fmt: skip
    model = get_peft_model(model, cfg)
    silo = parse_silo_config({"data-path": str(data), "name": "bench"})
    rows, _ = split_train_eval(load_silo_records(silo, "finance"), silo.eval_fraction, run.train.seed)
    examples = encode_records(tok, get_template("finance"), rows, s["seq"], True, "alpaca")
    tokens, seconds, k = 0, 0.0, 0
    for _ in range(s["rounds"]):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        start = time.perf_counter()
        for _ in range(s["steps"]):
            batch = collate([examples[(k + i) % len(examples)] for i in range(s["batch"])], tok.pad_token_id)
            k += s["batch"]
            tokens += int(batch["attention_mask"].sum())
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
    return {"tokens": tokens, "train_seconds": seconds}


def _child(mode: str, quick: bool, threads: int, data: Path) -> dict:
    import torch

    torch.set_num_threads(threads)
    s = _settings(quick)
    out = _silo(s, data) if mode == "silo" else _standalone(s, data)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["tokens_per_second"] = out["tokens"] / out["train_seconds"] if out["train_seconds"] else 0.0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds x 3 steps, seq 128 (else 5 x 10, 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=("silo", "standalone"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(_child(args.mode, args.quick, args.threads, Path(args.data))))
        return 0
    from demo.sample_data import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_data(Path(tmp), n_silos=1, per_silo=60, held_out=1)[0][0]
        res = {}
        for mode in ("standalone", "silo"):
            argv = [sys.executable, __file__, "--mode", mode, "--threads", str(args.threads)]
            argv += ["--data", str(data)] + (["--quick"] if args.quick else [])
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                return 1
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = res[mode]
            print(
                f"{mode:>10}: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, "
                f"{r['tokens_per_second']:.0f} tokens/s ({r['tokens']} tokens, {r['train_seconds']:.1f} s)"
            )
    summary = {
        "rss_ratio": res["silo"]["peak_rss_bytes"] / res["standalone"]["peak_rss_bytes"],
        "tokens_per_second_ratio": res["silo"]["tokens_per_second"] / res["standalone"]["tokens_per_second"],
        "threads": args.threads,
        "quick": args.quick,
    }
    ratios = f"RSS x{summary['rss_ratio']:.2f}, tokens/s x{summary['tokens_per_second_ratio']:.2f}"
    print(f"silo / standalone: {ratios}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
