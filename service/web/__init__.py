"""Static files of the live alerts page (served by service/alert_view.py)."""
