"""The archives behind the proxy: the Archive, its HTTP client, credentials, health and relays."""
