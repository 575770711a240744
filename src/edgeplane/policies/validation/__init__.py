"""Request validation (`models`, `routes[].request_validation`): see `plugin`."""
