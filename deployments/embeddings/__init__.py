"""The pool's embedding model as an OpenAI-compatible `POST /v1/embeddings`, and the one copy of the model
that the RAG services call through a handle (`deployments.embeddings.client`)."""
