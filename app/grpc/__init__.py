"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``) and the standard
health service, served beside HTTP in the same process and event loop."""
