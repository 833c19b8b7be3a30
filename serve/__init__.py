"""The UUE Ray Serve application (`serve run serve.app:build_app`, or the YAML configs beside this file)."""
