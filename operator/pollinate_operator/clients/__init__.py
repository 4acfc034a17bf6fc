"""The only modules that talk to the outside: Kubernetes, the Flower server, S3."""
