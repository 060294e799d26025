"""The central site. ``superlink.app``: the ServerApp and what it imports (round loop, round core,
reply checks, defences, strategies, checkpoints); it ships in the FAB. ``superlink.ops``: what runs
around Flower (CLI, launcher, Fleet proxy, admission, run submission and journal); it stays out."""
