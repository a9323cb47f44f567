"""Ray Serve apps, each with a typed build_app(args) (see the Serve issue)."""
