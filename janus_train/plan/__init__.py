"""Cluster planning: memory per GPU, traffic, step time and days of each stage under each
DeepSpeed preset (``janus-plan``, :mod:`janus_train.plan.cli`), and the checks
``launch/pipeline.sh`` runs on every stage before it submits anything
(:mod:`janus_train.plan.check`)."""
