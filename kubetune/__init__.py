"""kubetune core: the FineTuneJob API models, CRD and reference generation, vLLM arguments, K8s and S3 clients."""
