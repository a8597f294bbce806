"""Pydantic request and response schemas, one module per model. The examples here feed the OpenAPI
docs, the tests and the Locust payloads."""
