"""Observability: the Prometheus exporter, metric rendering, `flwr ls` traffic and the HTML report,
beside the Prometheus rules (prometheus/) and Grafana dashboards (grafana/) they feed."""
