"""OpenAI-compatible inference under ``/openai/v1`` (completions, chat, models).

``models`` says what a ``model`` names; ``schemas`` reads the request bodies; ``chat`` renders
the chat template; ``text`` turns tokens into OpenAI text; ``responses`` builds the objects;
``streaming`` sends server-sent events; ``errors`` gives every error OpenAI's shape. Sampling
itself is ``/v1/sample``'s (``sampling.routes.submit_sample``).
"""


def blueprint():
    """The ``/openai/v1`` blueprint (and install its error shape on the app separately)."""
    from eztinker_web.openai.routes import bp

    return bp
