"""Running the jobs and apps on a cluster: `pixelray submit` and `pixelray jobs` (submit.py, on Ray's Job
Submission SDK), KubeRay manifests, the ray-up config, the image and what ships with a job."""
