"""Ray Serve apps, each with a typed build_app(args): vlm.py (caption, VQA, chat, OpenAI /v1 and the
hybrid over autoscaled model deployments); the wire format in protocol.py, admission in admission.py,
the routes in routes_seed.py and routes_openai.py."""
