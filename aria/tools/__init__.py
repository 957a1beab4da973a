"""Analysis tools for trained models (``python -m aria.tools.<tool>``)."""
