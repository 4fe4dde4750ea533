# tvr on AWS: S3 buckets, IRSA roles scoped to them, and EKS node groups (GPU, decode CPU, system)
# on an existing EKS cluster. Validated offline in CI (tests/infra/test_manifests.py):
#   terraform init -backend=false -plugin-dir=<local provider mirror> && terraform validate
# State holds resource ids, not secrets; keep it in an encrypted remote backend (not in the repo).
terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.60, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      project    = "tvr"
      managed-by = "terraform"
    }
  }
}
