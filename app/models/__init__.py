"""Models: manifests, loading, the registry, the device and memory."""
