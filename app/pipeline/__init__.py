"""The pipeline: upload -> tensor -> (batch) -> pass -> maps -> answer, with no web framework."""
