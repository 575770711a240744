"""Configuration: YAML in, a validated model out, or every error with its location.

- `loader`: `load_config`, the two passes (schema, then semantic checks) over the raw dict.
- `model`: the frozen dataclasses every other package reads.
- `schema`: the JSON Schema of the file, assembled from the plugin registry.
- `context`: `LoadContext`, what every section's loader gets (built-in or plugin).
- `sections`, `routes`, `websockets`: the core sections' loaders.
- `values`, `humanize`: value parsers; jsonschema findings rewritten for humans.
- `errors`: located errors (`LocatedErrors`, `Problem`) and value descriptions.
- `yamlstrict`: YAML that refuses duplicate keys, and the line and column of each path.
- `envsubst`: `${NAME}` / `${NAME:-default}` in a file's values, from the environment.

May import: `plugins` (the registry), `routing.router` (route-key syntax),
`websocket.selection` (route selection syntax), `http.tls` (certificate checks),
`http.paths` (the path normalisation policy).
Policy units' own loaders live with the units, not here.
"""
