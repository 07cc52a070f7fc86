"""The Gemma families and their files: which bases train, their templates, their memory, their weights on disk."""
