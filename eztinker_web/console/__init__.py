"""The web console: server-rendered pages at ``/console`` over the JSON API (``routes``)."""
