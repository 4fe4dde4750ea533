# IAM roles for Kubernetes service accounts (IRSA): pods get short-lived credentials through the
# standard AWS chain (AWS_ROLE_ARN + web identity token), never keys.
#   tvr-ray    (service account tvr/tvr-ray):    read videos; read/write checkpoints (runs, Ray logs)
#   tvr-mlflow (service account tvr/tvr-mlflow): read/write the MLflow artifacts bucket
data "aws_eks_cluster" "this" {
  name = var.cluster_name
}

data "aws_iam_openid_connect_provider" "eks" {
  url = data.aws_eks_cluster.this.identity[0].oidc[0].issuer
}

locals {
  oidc_host = replace(data.aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")

  irsa = {
    ray = {
      service_account = "tvr-ray"
      read_buckets    = ["videos", "checkpoints"]
      write_buckets   = ["checkpoints"]
    }
    mlflow = {
      service_account = "tvr-mlflow"
      read_buckets    = ["mlflow"]
      write_buckets   = ["mlflow"]
    }
  }
}

data "aws_iam_policy_document" "assume" {
  for_each = local.irsa

  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [data.aws_iam_openid_connect_provider.eks.arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_host}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${each.value.service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_host}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "access" {
  for_each = local.irsa

  statement {
    sid       = "ListBuckets"
    effect    = "Allow"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [for b in each.value.read_buckets : aws_s3_bucket.this[b].arn]
  }

  statement {
    sid       = "ReadObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = [for b in each.value.read_buckets : "${aws_s3_bucket.this[b].arn}/*"]
  }

  statement {
    sid       = "WriteObjects"
    effect    = "Allow"
    actions   = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = [for b in each.value.write_buckets : "${aws_s3_bucket.this[b].arn}/*"]
  }

  statement {
    sid       = "UseTheDataKey"
    effect    = "Allow"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [aws_kms_key.data.arn]
  }
}

resource "aws_iam_role" "irsa" {
  for_each           = local.irsa
  name               = "${var.name_prefix}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume[each.key].json
}

resource "aws_iam_role_policy" "irsa" {
  for_each = local.irsa
  name     = "${var.name_prefix}-${each.key}-s3"
  role     = aws_iam_role.irsa[each.key].id
  policy   = data.aws_iam_policy_document.access[each.key].json
}
