"""HTTP serving: ``towerrec serve --run RUN`` keeps a run's towers and live index loaded and answers JSON.

:mod:`serve.live` holds the served version and swaps in a newly published one; :mod:`serve.api` is the
FastAPI app (and the page at ``/``); :mod:`serve.media` finds item posters in the catalog folder. Serving
imports ``index/``, ``data/`` and ``towers/``, never ``train/``.
"""
