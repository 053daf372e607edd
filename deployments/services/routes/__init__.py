"""The services' routes, one APIRouter per service; `deployments.services.api.create_api` includes them in
this order (the order of the published OpenAPI)."""
