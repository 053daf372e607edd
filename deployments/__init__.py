"""Ray Serve applications of the pool (gateway, llm, vision, RMA services, data-store supervisors).

Imports `rma_ray` only; meets `admission` over HTTP and Ray, never by import.
"""
