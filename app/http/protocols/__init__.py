"""Protocol adapters: KServe v1 and the Open Inference Protocol v2."""
