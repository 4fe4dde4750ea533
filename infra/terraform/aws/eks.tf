# Node groups on the existing EKS cluster, matching the KubeRay worker groups (nodeSelector tvr.io/pool):
#   gpu    p5.48xlarge   8 x H100 80 GB: ViT-bigG-14 under ZeRO-3, 7.1 GB model states per GPU on one
#                        node, 3.3 GB on four (docs/memory-plan.md); scale from 0, tainted for GPU pods only
#   decode c7i.16xlarge  Ray Data video decoding (PyAV), scale from 0
#   system m7i.2xlarge   Ray head, MLflow, Postgres, KubeRay operator
# The cluster autoscaler / Karpenter scales them; the NVIDIA AMI brings the driver and device plugin.
data "aws_iam_policy_document" "node_assume" {
  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = "${var.name_prefix}-eks-node"
  assume_role_policy = data.aws_iam_policy_document.node_assume.json
}

resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset([
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
  ])
  role       = aws_iam_role.node.name
  policy_arn = each.value
}

locals {
  node_groups = {
    gpu = {
      instance_types = var.gpu_instance_types
      ami_type       = "AL2023_x86_64_NVIDIA"
      disk_size      = 1000
      max_size       = var.gpu_max_nodes
      gpu_taint      = true
    }
    decode = {
      instance_types = [var.decode_instance_type]
      ami_type       = "AL2023_x86_64_STANDARD"
      disk_size      = 200
      max_size       = var.decode_max_nodes
      gpu_taint      = false
    }
    system = {
      instance_types = ["m7i.2xlarge"]
      ami_type       = "AL2023_x86_64_STANDARD"
      disk_size      = 100
      max_size       = 3
      gpu_taint      = false
    }
  }
}

resource "aws_eks_node_group" "this" {
  for_each        = local.node_groups
  cluster_name    = var.cluster_name
  node_group_name = "${var.name_prefix}-${each.key}"
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = var.subnet_ids
  instance_types  = each.value.instance_types
  ami_type        = each.value.ami_type
  disk_size       = each.value.disk_size
  capacity_type   = "ON_DEMAND"

  scaling_config {
    desired_size = each.key == "system" ? 2 : 0
    min_size     = each.key == "system" ? 2 : 0
    max_size     = each.value.max_size
  }

  labels = {
    "tvr.io/pool" = each.key
  }

  dynamic "taint" {
    for_each = each.value.gpu_taint ? [1] : []
    content {
      key    = "nvidia.com/gpu"
      value  = "true"
      effect = "NO_SCHEDULE"
    }
  }

  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.node]
}
