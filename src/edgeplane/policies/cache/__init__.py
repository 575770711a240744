"""The response cache policy (`routes[].cache`): see `plugin`."""
