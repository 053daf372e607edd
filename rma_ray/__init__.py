"""What every side of RMA Pool shares: settings, tiers and labels, the hardware probe, credentials,
the client-key verifier, the admission API client and the `rma` CLI.

Imports neither `admission` nor `deployments`: those meet through HTTP and Ray.
"""

__version__ = "0.1.0"
