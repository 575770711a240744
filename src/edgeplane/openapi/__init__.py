"""OpenAPI 3 import and export, with Amazon API Gateway's `x-amazon-apigateway-*` extensions
(`importer`, `exporter`, `commands`)."""
