variable "region" {
  description = "AWS region of the buckets and the EKS cluster."
  type        = string
  default     = "us-east-1"
}

variable "name_prefix" {
  description = "Prefix of every bucket and role name (bucket names are global: make it unique)."
  type        = string
  default     = "tvr"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,30}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix: 3-32 characters from [a-z0-9-], no leading or trailing '-'."
  }
}

variable "cluster_name" {
  description = "Name of the existing EKS cluster (with an IAM OIDC provider) that runs KubeRay."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the node groups (GPU nodes: subnets in the zones with p5 capacity)."
  type        = list(string)
}

variable "namespace" {
  description = "Kubernetes namespace of the Ray and MLflow service accounts."
  type        = string
  default     = "tvr"
}

variable "gpu_instance_types" {
  description = "GPU node instance types: 8 x 80 GB GPUs per node for ViT-bigG-14 under ZeRO-3 (docs/memory-plan.md)."
  type        = list(string)
  default     = ["p5.48xlarge"]
}

variable "gpu_max_nodes" {
  description = "Upper bound of the GPU node group (KubeRay gpu-h100 maxReplicas is 4)."
  type        = number
  default     = 4
}

variable "decode_instance_type" {
  description = "CPU nodes for Ray Data video decoding (KubeRay group decode-cpu)."
  type        = string
  default     = "c7i.16xlarge"
}

variable "decode_max_nodes" {
  description = "Upper bound of the decode node group."
  type        = number
  default     = 8
}

variable "noncurrent_version_days" {
  description = "Days old object versions are kept in the versioned buckets."
  type        = number
  default     = 30
}
