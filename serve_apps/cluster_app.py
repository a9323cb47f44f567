"""The cluster Serve app of serve_apps/configs/cluster.yaml as one bound Application, for `serve build`:
its output is the `serveConfigV2` of cluster/kuberay/rayservice.yaml (a test keeps the two equal).

Run as:
    serve build pixelray.serve_apps.cluster_app:app -o /tmp/serve_config.yaml
"""

from pathlib import Path

import yaml

from pixelray.serve_apps.vlm import build_app

CONFIG = Path(__file__).parent / "configs" / "cluster.yaml"

app = build_app(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])
