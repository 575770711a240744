"""Custom authorizer: a REQUEST authorizer called over HTTP with AWS payload 2.0 (`client`).
"""
