"""Model architectures shipped with camserve (loaded through manifest entry points)."""
