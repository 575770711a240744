"""Deployments: immutable recorded APIs, each stage's pointer to one, and canaries.

- `store`, `redis_store`: where deployments and stage pointers live (SQLite in the data
  directory, or Redis with `cluster:`), with history;
- `served`: what each stage serves, read from the store and attached to a config;
- `watch`: noticing a change in the store, so the running gateway reloads;
- `commands`: `edgeplane deploy`, `deployments`, `rollback`, `canary promote|abort`.
"""
