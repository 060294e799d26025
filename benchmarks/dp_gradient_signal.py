"""Why DP-SGD at a silo learns the label prior: what per-record clipping and the noise do to one step.

SmolLM2-135M-Instruct (embedded) with LoRA r=4 on q,v (the shape of the DP rows in BENCHMARKS.md),
from the seeded adapter or from ``--adapter`` (e.g. the public start that ``benchmarks/privacy.py
--public-start fpb`` caches in benchmarks/results/privacy/). For N TFNS training rows it takes each
record's gradient on its answer tokens (one record at a time: the exact per-record gradient DP-SGD
clips) and reports, for each clipping norm C:

- the share of records clipped, and the cosine between the clipped mean and the true mean gradient;
- the share of the step's gradient weight each label gets (sum of its records' clipped norms),
  against the unclipped shares: clipping gives every large-gradient record the same weight C, and
  the labels the model gets wrong have the largest gradients;
- the step's signal-to-noise ratio: |clipped mean| / (sigma x C / B x sqrt(d)), the noise's
  expected norm over the adapter's d coordinates, at each logical batch B with sigma calibrated by
  the silo's own planner (silo_node/app/privacy.py ``plan_round``) for epsilon 8 at delta 1e-5 over
  the run's steps on 3,000 rows.

Each figure twice, side by side from the same gradients: training A and B, and B alone
(``peft.freeze-lora-a``: B's per-record gradient is the same whether A is trained, so restricting
the coordinates is exactly what a frozen-A silo clips and noises).

    python benchmarks/dp_gradient_signal.py --quick    # 32 records
    python benchmarks/dp_gradient_signal.py --adapter benchmarks/results/privacy/public-start-*.safetensors

Prints a table, then one JSON line: ``trained`` (per "A and B" / "B alone": ``dimensions``,
``grad_norm_percentiles``, ``per_label``) and ``rows`` (one per trained, C and B:
``clipped_share``, ``cosine``, ``label_weight``, ``noise_multiplier``, ``signal_to_noise``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from poisoned_silo import _data_root  # noqa: E402  (benchmarks/ is the script's own folder)
from privacy import _tfns  # noqa: E402  (the TFNS reader of benchmarks/privacy.py)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 records (a minute or two on 2 cores)")
    ap.add_argument("--records", type=int, help="TFNS training rows to take gradients of (default 256)")
    ap.add_argument(
        "--adapter", type=Path, help="a .safetensors adapter state to start from (default: seeded)"
    )
    ap.add_argument("--clips", default="0.1,0.5,1,2,5", help="clipping norms C")
    ap.add_argument("--batches", default="64,256", help="logical batches B")
    ap.add_argument("--steps", type=int, default=40, help="the run's DP steps a silo (noise calibration)")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    n_records = args.records or (32 if args.quick else 256)

    import torch
    from safetensors.numpy import load_file

    from silo_node.app.policy import PrivacyPolicy
    from silo_node.app.privacy import per_sample_loss, plan_round
    from silo_node.app.templates import get_template
    from silo_node.app.training import collate, encode_records
    from silotune.adapters import attach_adapter, load_adapter_state
    from silotune.config import EMBEDDED_MODEL, parse_run_config
    from silotune.modeling import load_model

    run = parse_run_config(
        {
            "model.name": EMBEDDED_MODEL,
            "peft.rank": 4,
            "peft.alpha": 4,
            "peft.target-modules": "q_proj,v_proj",
            "train.prompt-style": "eval",
            "train.seq-length": 96,
            "train.seed": 11,
        }
    )
    loaded = load_model(run.model)
    tok = loaded.tokenizer
    model = attach_adapter(loaded.model, run.peft, 4, run.train.seed)
    if args.adapter:
        load_adapter_state(model, load_file(str(args.adapter)))
    rows = _tfns(_data_root() / "tfns" / "sent_train.csv")
    random.Random(args.seed).shuffle(rows)
    rows = rows[:n_records]
    examples = encode_records(tok, get_template("finance"), rows, 96, run.model.use_chat_template, "eval")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # B's coordinates: restricted to them, the same per-record gradients are what DP-SGD clips when
    # A is frozen (peft.freeze-lora-a), since B's gradient does not depend on A being trained.
    is_b = np.concatenate([np.full(p.numel(), ".lora_B." in n) for n, p in named])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    t0 = time.monotonic()
    grads, losses = [], []
    device = params[0].device  # the GPU where there is one (load_model's choice)
    for ex in examples:  # one record at a time: its exact gradient, as DP-SGD clips it
        batch = {k: v.to(device) for k, v in collate([ex], pad).items()}
        loss = per_sample_loss(model, batch).sum()  # the silo's DP loss, one record
        g = torch.autograd.grad(loss, params)
        grads.append(torch.cat([x.flatten() for x in g]).float().cpu().numpy().copy())
        losses.append(float(loss.detach()))
    seconds = time.monotonic() - t0
    full = np.stack(grads)
    labels = np.array([r["output"] for r in rows])
    names = ("negative", "neutral", "positive")
    out_rows: list[dict[str, Any]] = []
    per_trained: dict[str, dict[str, Any]] = {}
    for trained, grad in (("A and B", full), ("B alone", full[:, is_b])):
        norms = np.linalg.norm(grad, axis=1)
        dims = grad.shape[1]
        mean = grad.mean(0)
        per_label = {
            c: {
                "records": int((labels == c).sum()),
                "mean_loss": round(float(np.mean(np.array(losses)[labels == c])), 3),
                "median_grad_norm": round(float(np.median(norms[labels == c])), 3),
            }
            for c in names
            if (labels == c).any()
        }
        per_trained[trained] = {
            "dimensions": dims,
            "grad_norm_percentiles": {
                f"p{q}": round(float(np.percentile(norms, q)), 3) for q in (10, 50, 90)
            },
            "per_label": per_label,
            "label_weight_unclipped": {
                c: round(float(norms[labels == c].sum() / norms.sum()), 3) for c in per_label
            },
        }
        for clip in (float(x) for x in args.clips.split(",")):
            factor = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
            clipped = (grad * factor[:, None]).mean(0)
            weight = factor * norms
            cosine = float(mean @ clipped / (np.linalg.norm(mean) * np.linalg.norm(clipped)))
            for batch in (int(x) for x in args.batches.split(",")):
                # sigma as a silo's planner sets it for epsilon 8 over the run's steps on 3,000 rows.
                shaped = run.train.model_copy(update={"batch_size": batch, "local_steps": args.steps})
                policy = PrivacyPolicy(target_epsilon=8.0, epsilon_budget=8.0, delta=1e-5, max_grad_norm=clip)
                plan = plan_round(policy, run.model_copy(update={"train": shaped, "num_rounds": 1}), 3000)
                noise = plan.noise_multiplier * clip / batch * np.sqrt(dims)
                out_rows.append(
                    {
                        "trained": trained,
                        "clip": clip,
                        "batch": batch,
                        "clipped_share": round(float(np.mean(norms > clip)), 3),
                        "cosine": round(cosine, 3),
                        "label_weight": {
                            c: round(float(weight[labels == c].sum() / weight.sum()), 3) for c in per_label
                        },
                        "noise_multiplier": round(plan.noise_multiplier, 4),
                        "signal_to_noise": round(float(np.linalg.norm(clipped) / noise), 4),
                    }
                )
    start = f"from {args.adapter}" if args.adapter else "seeded"
    print(f"{len(examples)} TFNS records, adapter {start}, {seconds:.0f} s")
    for trained, t in per_trained.items():
        print(
            f"trained {trained}: d = {t['dimensions']}, per-record gradient norm {t['grad_norm_percentiles']}"
        )
        for c, v in t["per_label"].items():
            print(
                f"  {c}: {v['records']} records, loss {v['mean_loss']}, median norm {v['median_grad_norm']}"
            )
        print(f"  gradient weight per label, unclipped: {t['label_weight_unclipped']}")
    print(
        "| trained | C | B | clipped | cos(clipped, mean) | weight neg / neu / pos | sigma (eps 8) "
        "| signal/noise |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in out_rows:
        w = " / ".join(f"{r['label_weight'].get(c, 0):.2f}" for c in names)
        print(
            f"| {r['trained']} | {r['clip']:g} | {r['batch']} | {100 * r['clipped_share']:.0f} % | "
            f"{r['cosine']:.3f} | {w} | {r['noise_multiplier']} | {r['signal_to_noise']:.3f} |"
        )
    summary = {"records": len(examples), "adapter": str(args.adapter) if args.adapter else "seeded",
               "trained": per_trained, "rows": out_rows}  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
