"""Multi-process workers of the distributed tests, launched as subprocesses: ``dist_worker`` (every data-parallel
wrapping on CPU gloo ranks) and ``dist_trainer`` (the trainers under ``accelerate launch``)."""
