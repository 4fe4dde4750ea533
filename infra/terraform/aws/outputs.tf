output "buckets" {
  description = "Bucket names: videos (data.root), checkpoints (storage.uri), mlflow (tracking server artifacts)."
  value       = { for k, b in aws_s3_bucket.this : k => b.bucket }
}

output "checkpoints_bucket" {
  description = "For storage.uri = s3://<this>/runs and the Fluent Bit LOG_BUCKET."
  value       = aws_s3_bucket.this["checkpoints"].bucket
}

output "mlflow_bucket" {
  description = "For the MLflow server's --artifacts-destination s3://<this>/artifacts."
  value       = aws_s3_bucket.this["mlflow"].bucket
}

output "ray_role_arn" {
  description = "Annotate the service account tvr/tvr-ray with this (eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.irsa["ray"].arn
}

output "mlflow_role_arn" {
  description = "Annotate the service account tvr/tvr-mlflow with this (eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.irsa["mlflow"].arn
}
