"""An institution's silo. ``silo_node.app``: the ClientApp and what it imports (data, templates,
local training, policy, privacy, audit, the resident cache); it ships in the FAB. ``silo_node.ops``:
what runs around Flower (CLI, launcher, supervisor, resident worker, code pinning, clock check, data
tools); it stays out."""
