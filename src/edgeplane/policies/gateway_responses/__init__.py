"""Gateway responses (`gateway_responses`): see `plugin`."""
