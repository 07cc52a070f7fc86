"""The operator's tools: the command line, launching jobs, sweeps, Vertex AI, the request's reference."""
