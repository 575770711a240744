"""IP rules policy: client IP behind trusted proxies, allow/deny CIDR rules.
"""
