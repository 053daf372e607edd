"""The RMA application services on Ray Serve: one FastAPI ingress (the gateway, at /api) in front of documents,
OCR, uploads, notes, RAG and graph deployments placed on service-tier nodes. `app.build_app()` builds the Serve
application that `rma up` deploys; `api.create_api()` is the FastAPI app itself, over backends that are Serve
handles in production and in-process objects in unit tests."""
