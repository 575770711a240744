"""CORS policy: preflights answered by the gateway, response headers on actual requests.
"""
