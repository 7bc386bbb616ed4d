"""WebSocket support and a pub/sub broadcast hub for Pyramid, on eventlet."""
