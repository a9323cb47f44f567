"""Ray Serve apps, each with a typed build_app(args): vlm.py (caption, VQA, chat, OpenAI /v1 and the
hybrid over autoscaled model deployments; /v1/embeddings over encoder deployments, embedder.py; /search
over store index deployments, search.py); the wire format in protocol.py, admission in admission.py,
the routes in routes_seed.py, routes_openai.py and routes_search.py."""
