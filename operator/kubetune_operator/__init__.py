"""The kubetune operator (kopf): FineTuneJob -> ConfigMap, RBAC and KubeRay RayJob -> status -> vLLM Deployment."""
