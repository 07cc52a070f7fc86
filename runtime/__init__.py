"""The job's running: its settings, logs, errors, processes, trackers and progress."""
