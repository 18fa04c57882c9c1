"""Cluster planning: memory per GPU, traffic, step time and days of each stage under each
DeepSpeed preset, the search for the fastest that fits (:mod:`janus_train.plan.search`; the
``janus-plan`` command line is :mod:`janus_train.cli.plan`), and the checks
``launch/pipeline.sh`` runs on every stage before it submits anything
(:mod:`janus_train.plan.check`, run by ``python -m janus_train.cli.check``)."""
