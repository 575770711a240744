"""JWT authorizer: token verification (`verify`), JWKS parsing (`jwks`), JWKS URLs (`jwks_source`).
"""
