"""Data files shipped with embedtune."""
