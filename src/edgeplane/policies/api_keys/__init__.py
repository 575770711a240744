"""API-key authorizer: the key file (`store`, also the `edgeplane keys` commands).
"""
