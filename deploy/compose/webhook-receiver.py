"""A webhook receiver for docker-compose.yml: prints each request's CloudEvents, answers 204.

Standard library only, so it runs on any python image.
"""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ctype = self.headers.get("Content-Type", "")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = body.decode("utf-8", "replace")
        # Batch mode sends a JSON array of events, structured mode one event, binary mode the
        # data with the attributes in ce-* headers.
        events = payload if isinstance(payload, list) else [payload]
        for event in events:
            if isinstance(event, dict) and "specversion" not in event:
                attrs = {k[3:].lower(): v for k, v in self.headers.items()
                         if k.lower().startswith("ce-")}
                event = {**attrs, "data": event}
            print(f"{self.command} {self.path} {ctype}: {json.dumps(event)}", flush=True)
        self.send_response(204)
        self.end_headers()

    do_PUT = do_POST

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per event above is enough


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
