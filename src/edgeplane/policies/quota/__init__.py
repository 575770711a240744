"""Usage plans' quotas: per-key request counters per DAY/WEEK/MONTH, persisted in SQLite (`store`).
"""
