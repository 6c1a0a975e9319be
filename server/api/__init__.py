"""The HTTP layer: `server.api.app.create_app(config)` builds the FastAPI app around one engine."""
