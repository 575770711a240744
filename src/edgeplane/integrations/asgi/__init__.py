"""The `asgi` integration: an ASGI 3 application run in process on the gateway's loop (see `plugin`)."""
