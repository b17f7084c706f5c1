"""The OCI Distribution Specification v1.1 HTTP API of the storage role: app (routes and handlers),
errors (spec error codes, one place), auth (tokens), uploads (sessions), manifests, names."""
