"""``silotune compare``: isolated vs federated (FedAvg, FlexLoRA) vs centralized, same budget.

NOT IMPLEMENTED YET. The plan, for whoever picks it up once the training core is stable:

1. split one training file into N silos with ``silo_node.data`` (same split the launcher uses);
2. with the same total number of local steps S: train each silo alone for S/N steps (isolated),
   run the federation with ``strategy.name=fedavg`` and ``=flexlora`` (rounds x local steps x N = S),
   and train once on the union for S steps (centralized), all through ``silo_node.training``;
3. evaluate every resulting adapter with ``evaluation.runner.evaluate_suite`` on the domain's suite;
4. report one table: setting, accuracy per benchmark, average, and bytes communicated (uplink +
   downlink from the run's metrics; 0 for isolated and centralized).
"""

from __future__ import annotations

import argparse

from silotune.errors import UserError


def run_compare(args: argparse.Namespace) -> int:
    raise UserError(
        "silotune compare is not implemented yet: it needs the federated training core "
        "(silo_node/training.py, superlink/strategies) wired for in-process runs; see "
        "evaluation/compare.py for the plan. Meanwhile run the settings with `silotune run` "
        "and score each adapter with `silotune eval --adapter DIR`."
    )
