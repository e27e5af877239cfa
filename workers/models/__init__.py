"""Model runtime: the Detector contract, the registry of plug-ins and the built-in models."""
