"""HTTP routes: each parses, authenticates (its auth level declared in openapi_extra) and calls one service."""
