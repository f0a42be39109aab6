"""Local and container deployment: the embedded broker, the local stack launcher, Prometheus and Grafana."""
