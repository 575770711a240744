"""Configuration: YAML in, a validated model out, or every error with its location.

- `loader`: `load_config`, the two passes (schema, then semantic checks) over the raw dict.
- `model`: the frozen dataclasses every other package reads.
- `schema`: the JSON Schema of the file, assembled with the policies' fragments.
- `errors`: located errors (`LocatedErrors`) and value descriptions for messages.
- `yamlstrict`: YAML that refuses duplicate keys.

May import: `plugins` (the registry of policy and integration units). Nothing else.
"""
