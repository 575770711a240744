"""Parameter mapping (`request_parameters`, `response_parameters`): see `plugin`."""
