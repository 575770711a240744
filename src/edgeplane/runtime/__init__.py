"""The running gateway: processes, lifecycle and operator surfaces.

- `gateway`: `Gateway`, one worker's listeners, lifecycle and drain (the embedding API);
  `gateway_ws` its WebSocket half.
- `reload`: a new config applied live (what carries over, what is refused).
- `takeover`: handing the listening sockets to a successor (`serve --takeover`).
- `serving`: one serving process: its loop, signals (HUP, USR1, USR2, TERM) and reloads.
- `workers`: `workers: N`, the supervisor and its worker processes.
- `systemd`: sd_notify, process titles, the pidfile.
- `ports`: one owner per listen address (lock files), bind errors, descriptor limits.
- `admin`: the admin listener's API (/healthz, /stats, /upstreams, @connections).
- `cli`: the `edgeplane` command.
- `accesslog`: buffered JSON access-log lines.
- `logs`: process logging setup.
- `demo_upstream`: the bundled demo upstream (`edgeplane demo-upstream`).

May import every other package; nothing imports it except `edgeplane` itself.
"""
