"""Pure functions from a resource's spec to the Kubernetes objects it implies. No I/O."""
