"""`python -m nanovllmx.entrypoints.openai.api_server`: the OpenAI-compatible server."""
