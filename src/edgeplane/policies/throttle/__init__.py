"""Throttling: token buckets (`buckets`) and where they live (`stores`: in process,
`shared_limits`/`shared_keys` across workers, `cluster` through Redis).
"""
