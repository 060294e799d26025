"""The ServerApp and everything it imports; shipped in the FAB. Never imports ``superlink.ops``."""
