"""Route matching and the compiled snapshot.

- `router`: AWS route keys compiled into a host -> segment -> method trie.
- `chain`: per route, the stages and hooks the registered policies compile, in phase
  order; `describer` for `edgeplane routes`.
- `snapshot`: `Snapshot` (router + compiled routes), built once per config load.

May import: `http`, `config`, `plugins`, `upstream`, and the policy units through the
plugin registry.
"""
