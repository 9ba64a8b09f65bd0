"""The server side: protocol, application assembly, edge layer, limits, CORS, responses."""
