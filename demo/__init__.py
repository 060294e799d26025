"""Everything on one machine: the demo and the local TLS federation it runs, with its own sample data."""
