"""The ext_authz gRPC service: authenticates, rate-limits, gates plans and signs upstream requests."""
