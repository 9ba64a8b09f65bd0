"""Inbound authentication and scopes, and the token pass-through admission rule."""
