"""The ClientApp and everything it imports; shipped in the FAB. Never imports ``silo_node.ops``."""
