"""The protocols' codecs, shared by every transport (HTTP now; gRPC next).

A codec turns a protocol's request (KServe v1 instances, Open Inference Protocol tensors, the
binary tensor data extension, the model-repository extension) into what the pipeline takes
(uploads, ``ExplainParams``, the outputs wanted) and renders the pipeline's answer back into the
protocol's shapes. Nothing here knows a web framework: a transport parses its wire format into
these models and byte buffers, calls these functions, and writes what they return.
"""
