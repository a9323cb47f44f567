"""Cluster configs and job submission (KubeRay, ray up; see the cluster issue)."""
