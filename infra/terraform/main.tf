# Artifact storage for slipway: one S3 bucket, encrypted by default with a customer-managed KMS key,
# versioned, private, and an IAM policy granting slipway exactly what the artifact store does:
# put/get/head/list under its prefix, and use of the key (GenerateDataKey for SSE-KMS and prompt logs).

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = { source = "hashicorp/aws", version = ">= 5.0" }
  }
}

variable "bucket" {
  description = "Name of the artifact bucket (SLIPWAY_ARTIFACT_ROOT=s3://<bucket>/<prefix>)."
  type        = string
}

variable "prefix" {
  description = "Key prefix slipway writes under."
  type        = string
  default     = "slipway"
}

variable "retention_days" {
  description = "Days noncurrent object versions are kept."
  type        = number
  default     = 90
}

resource "aws_kms_key" "artifacts" {
  description             = "slipway artifacts and prompt logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
}

resource "aws_kms_alias" "artifacts" {
  name          = "alias/slipway-artifacts"
  target_key_id = aws_kms_key.artifacts.key_id
}

resource "aws_s3_bucket" "artifacts" {
  bucket = var.bucket
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.artifacts.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    id     = "expire-noncurrent"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.retention_days
    }
  }
}

data "aws_iam_policy_document" "slipway" {
  statement {
    sid       = "ListPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.artifacts.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.prefix}/*"]
    }
  }
  statement {
    sid       = "ReadWriteObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = ["${aws_s3_bucket.artifacts.arn}/${var.prefix}/*"]
  }
  statement {
    sid       = "UseKey"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [aws_kms_key.artifacts.arn]
  }
}

resource "aws_iam_policy" "slipway" {
  name   = "slipway-artifacts"
  policy = data.aws_iam_policy_document.slipway.json
}

output "artifact_root" {
  value = "s3://${aws_s3_bucket.artifacts.bucket}/${var.prefix}"
}

output "kms_key_id" {
  description = "Set as SLIPWAY_S3_KMS_KEY_ID."
  value       = aws_kms_key.artifacts.arn
}

output "iam_policy_arn" {
  value = aws_iam_policy.slipway.arn
}
