"""The CAM quality benchmark in parts: data, evaluation, class sensitivity, report."""
