"""The running gateway: processes, lifecycle and operator surfaces.

- `gateway`: `Gateway`, one worker's listeners, lifecycle and drain (the embedding API).
- `workers`: `workers: N`, the supervisor and its worker processes.
- `admin`: the admin listener's API (/healthz, /stats, /upstreams, @connections).
- `cli`: the `edgeplane` command.
- `accesslog`: buffered JSON access-log lines.
- `logs`: process logging setup.
- `demo_upstream`: the bundled demo upstream (`edgeplane demo-upstream`).

May import every other package; nothing imports it except `edgeplane` itself.
"""
