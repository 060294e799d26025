"""The central site's operator tooling around Flower: CLI, launcher, Fleet proxy, admission, run
submission and journal. Not in the FAB; may import ``superlink.app``, never the other way."""
