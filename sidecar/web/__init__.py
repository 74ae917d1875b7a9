"""The HTTP edge: the Flask application factory, views and the one error writer."""
