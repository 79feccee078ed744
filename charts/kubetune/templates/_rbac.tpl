{{/*
The rules the operator needs wherever it reconciles FineTuneJobs: a ClusterRole when it watches every
namespace, a Role in each watched namespace otherwise. Each rule names only the verbs the operator uses;
docs/helm.md explains every one. No pods or nodes: KubeRay, not kubetune, creates the Ray pods. Secrets only
`get`: the trainer pods read the S3 keys themselves (secretKeyRef); the operator only checks that the Secret a
job names exists and has both keys (no list, no watch: it cannot enumerate Secrets).
*/}}
{{- define "kubetune.rbac.jobRules" -}}
# Watch FineTuneJobs and read them; patch only their metadata (kopf's bookkeeping annotations), never spec.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Write status. get is also there because the per-job trainer Role grants get/patch on this job's status
# (and get on the job), and RBAC lets the operator grant only what it holds itself.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# The RayJob that runs the training (KubeRay turns it into a RayCluster and pods); watched for status,
# patched for the live fields (suspend, activeDeadlineSeconds). Never deleted by the operator: the garbage
# collector removes it with its FineTuneJob (owner reference).
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The resolved trainer config; patched while no RayJob has used it yet. Shared inference servers
# (docs/serving.md): their declarations are watched (list, watch), each job's adapter registration is
# written and deleted when the job stops serving there.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The trainer's identity and its permission to report progress into its own job's status.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
# Serving the fine-tuned model: the vLLM Deployment (watched for availability; replaced whole when spec.deploy
# changes, since a merge patch cannot drop a key such as a GPU limit) and its Service.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
# The credentials Secret a job names: read once before the RayJob is made, so that a missing Secret or key
# is a condition naming both (kubetune_operator.guards); the values are dropped as soon as they arrive.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# The NetworkPolicy that admits only the job's pods (and the operators) to its Ray head.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
# Events on FineTuneJobs for every transition (the operator's and kopf's); listed once when a job ends, to
# keep them (with its final conditions) in the job's history ConfigMap past the Events' TTL.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end -}}
