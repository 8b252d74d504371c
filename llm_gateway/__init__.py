"""The `llm-gateway` command: runs the services, migrations and admin tasks."""
