"""The demo's evaluation metrics, plugged into ``janus_train.evaluate.run_eval`` through
``train.eval_metrics=[janus_demo.metrics:scene_metrics]`` (``launch/demo.sh`` and the report pass it).

- ``gen/scene_accuracy``: the decoded image's recognised objects (colour + shape per quadrant,
  ``janus_demo.recognize``) equal the prompt's scene, over the prompts whose record carries one;
- ``gen/object_accuracy``: the fraction of the prompts' objects recognised at their position;
- ``gen/unseen_object_accuracy``: the same for objects whose (colour, shape, position) never occurs
  in the demo's training data (``janus_demo.world.heldout_triples``).
"""

from __future__ import annotations

import numpy as np

from janus_demo.recognize import recognize_scene, scene_set
from janus_demo.world import Obj, heldout_triples

SCENE_METRICS = "janus_demo.metrics:scene_metrics"
"""The ``train.eval_metrics`` entry of the demo."""


def scene_metrics(outputs) -> dict[str, float]:
    """Scene, object and unseen-object accuracy of ``outputs`` (``GenerationOutputs``); ``{}`` when
    no prompt's metadata carries a ``scene``."""
    scenes = [
        (meta["scene"], im)
        for meta, im in zip(outputs.metadata, outputs.images)
        if isinstance(meta.get("scene"), list)
    ]
    if not scenes:
        return {}
    unseen = heldout_triples()
    found = [recognize_scene(im) for _, im in scenes]
    metrics = {
        "gen/scene_accuracy": float(
            np.mean([scene_set(sc) == f for (sc, _), f in zip(scenes, found)])
        )
    }
    # (object is a held-out triple, object recognised at its position)
    hits = [
        (Obj(**o) in unseen, scene_set([o]) <= f) for (sc, _), f in zip(scenes, found) for o in sc
    ]
    metrics["gen/object_accuracy"] = float(np.mean([h for _, h in hits]))
    if any(u for u, _ in hits):
        metrics["gen/unseen_object_accuracy"] = float(np.mean([h for u, h in hits if u]))
    return metrics
