"""Segmentation serving behind ``/segment``: admission control (:mod:`.admission`), the in-memory
multipart reader (:mod:`.multipart`), clinician prompts (:mod:`.prompts`), request → job
(:mod:`.jobs`) and the segmentation of one job (:mod:`.service`). The routes
(``backend.app.api.routes.segment``) only route; nothing here imports FastAPI's router.
"""
