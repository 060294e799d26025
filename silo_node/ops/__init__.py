"""A silo's operator tooling around Flower: CLI, launcher, supervisor, resident worker, code
pinning, clock check, data tools. Not in the FAB; may import ``silo_node.app``, never the other way."""
