{{/*
The rules the operator needs wherever it reconciles FineTuneJobs: a ClusterRole when it watches every
namespace, a Role in each watched namespace otherwise. Each rule names only the verbs the operator uses;
docs/helm.md explains every one. No secrets, pods or nodes: the trainer pods read the S3 credentials
Secret themselves (secretKeyRef), and KubeRay, not kubetune, creates the Ray pods.
*/}}
{{- define "kubetune.rbac.jobRules" -}}
# Watch FineTuneJobs; patch their metadata (kopf's handler annotations and finalizer), never their spec.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Write status. The per-job trainer Role grants get/patch on finetunejobs/status and get on finetunejobs,
# and RBAC only lets the operator grant what it holds itself.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# The RayJob that runs the training (KubeRay turns it into a RayCluster and pods).
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The resolved trainer config.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The trainer's identity and its permission to report progress into the job's status.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Serving the fine-tuned model: the vLLM Deployment and its Service.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Events on FineTuneJobs for every transition (kopf posts them with create; repeats are patched).
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
