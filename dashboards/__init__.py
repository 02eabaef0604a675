"""Where people look at gate behaviour: TensorBoard layouts, the live page, Grafana, reports."""
