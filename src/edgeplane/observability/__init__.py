"""Observability: what an operator reads of a running gateway.

- `metrics`: the per-worker request counters and histograms the hot path adds to
  (fixed arrays, one set per route key), and the series they make.
- `families`: every metric family edgeplane exports (name, type, labels, help).
- `collect`: a worker's series, gathered from the request metrics, the upstream
  pools, the reload counters and the gauges.
- `aggregate`: the per-worker files that make `/metrics` and `/stats` one view of every
  worker, and keep counters from going down when a worker restarts.
- `exposition`: the Prometheus text format and OpenMetrics.
- `dashboard`: the admin listener's `GET /` page and its sign-in page (HTML, script and
  styles inline, in `static/`), which read `/stats`, `/metrics`, `/routes`, `/upstreams`.
"""
