"""The `function` integration: a Python handler called in process with the Lambda proxy payload (see `plugin`)."""
