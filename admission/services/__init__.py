"""The coordinator's logic; routes only parse, authenticate and call one function here."""
