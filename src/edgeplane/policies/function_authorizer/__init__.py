"""A Python function as a Lambda REQUEST authorizer (`authorizers.NAME.type: function`): see `plugin`."""
