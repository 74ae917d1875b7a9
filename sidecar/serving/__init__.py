"""The serving boundary: everything that knows the HTTP server, its processes and signals.
Nothing below it (the web app, the stores, the exchange core) imports it."""
