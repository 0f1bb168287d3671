"""The job queue and worker, and the batch identification job kind."""
