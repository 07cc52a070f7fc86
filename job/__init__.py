"""One attempt of a job around the workflow, and the services it is given."""
