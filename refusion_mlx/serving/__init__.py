"""The OpenAI-compatible server, by job (``refusion_mlx.server`` is its command line):

* ``service``    request intake: the model's name and limits, the checks before and after
                 tokenizing, one ``engine.Job`` per choice;
* ``answers``    a job's commits into OpenAI's response objects (``Answer``: a choice's
                 ``transcript.TextTranscript`` and what was streamed; ``Reply``: the request's);
* ``http``       Starlette's routes, request bodies with their bounds, whole and streamed answers,
                 every error in OpenAI's JSON shape;
* ``transport``  uvicorn's h11 protocol with our bounds and errors, the socket, ``make_server``.
"""
