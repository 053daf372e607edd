"""The admission coordinator: decides who may join the pool and in which tier, issues join tokens, node and
client credentials, keeps the registry, and revokes. Small enough for a free-tier host (FastAPI + SQLAlchemy,
SQLite by default, Postgres in production)."""
