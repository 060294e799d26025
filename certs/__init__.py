"""Federation identity tooling: CA, SuperLink server certificate, silo node keys."""
