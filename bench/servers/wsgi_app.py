"""A tiny WSGI app for `bench/run-servers.sh` (gunicorn): 200 text on GET /."""
import os

BODY = f"wsgi generation {os.environ.get('BATON_GENERATION', '?')}\n".encode()


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
