"""Serving: classify images from the command line (:mod:`serving.predict`), a Triton model repository
from a model's artifacts (:mod:`serving.triton_repo`), a real Triton server (:mod:`serving.server`) and
its load test (:mod:`serving.loadtest`). Imports go one way: serving uses t2t_vit, export, engines and
evaluation helpers; nothing below imports serving."""
