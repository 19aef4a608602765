"""The app's views, one module per group (imported by app/app.py)."""
