"""Datasets: annotation manifests + video storage -> Ray Data pipelines of ready tensors."""
