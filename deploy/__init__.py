"""Site kits (`silotune kit`): per-site deployment bundles generated from one federation file, beside
the compose (compose/), Kubernetes (k8s/) and Docker (docker/) templates they are made from."""
