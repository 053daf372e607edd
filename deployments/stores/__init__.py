"""Data stores supervised by Ray: one detached, named actor per store (`rma-store-<store>` in namespace `rma`)
owns the store's lifecycle on a trusted data-tier node; services find it by name and ask for its endpoint."""
