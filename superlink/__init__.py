"""Code that runs at the central site: the ServerApp, strategies, checkpoints, launch, admission."""
