"""The proxy's data path: the mitmproxy addon, the worker leg, routing and their limits."""
