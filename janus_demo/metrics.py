"""The demo's evaluation metrics, plugged into ``janus_train.evaluate.run_eval`` through
``eval.metrics=[janus_demo.metrics:scene_metrics]`` (``launch/demo.sh`` and the report pass it).

- ``gen/token_accuracy_blank_baseline``: the token accuracy of "drawing" a blank (black) image,
  the floor a model must beat when images are objects on a black background (the demo world's);
- ``gen/object_token_accuracy``: the generated codes' accuracy on the positions whose reference
  code differs from the blank image's there (the objects);

- ``gen/scene_accuracy``: the decoded image's recognised objects (colour + shape per quadrant,
  ``janus_demo.recognize``) equal the prompt's scene, over the prompts whose record carries one;
- ``gen/object_accuracy``: the fraction of the prompts' objects recognised at their position;
- ``gen/unseen_object_accuracy``: the same for objects whose (colour, shape, position) never occurs
  in the demo's training data (``janus_demo.world.heldout_triples``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from janus_demo.recognize import recognize_scene, scene_set
from janus_demo.world import Obj, heldout_triples

SCENE_METRICS = "janus_demo.metrics:scene_metrics"
"""The ``eval.metrics`` entry of the demo."""


def blank_baseline(outputs) -> dict[str, float]:
    """The blank-image baseline and the object positions' token accuracy of ``outputs``."""
    ref = outputs.reference_codes
    blank = outputs.encode([Image.new("RGB", outputs.images[0].size)])  # the model's image size
    metrics = {"gen/token_accuracy_blank_baseline": float((ref == blank).float().mean())}
    fg = ref != blank
    if bool(fg.any()):
        metrics["gen/object_token_accuracy"] = float((outputs.codes == ref)[fg].float().mean())
    return metrics


def scene_metrics(outputs) -> dict[str, float]:
    """The blank-image baseline (:func:`blank_baseline`), and scene, object and unseen-object
    accuracy of ``outputs`` (``GenerationOutputs``) when a prompt's metadata carries a
    ``scene``."""
    metrics = blank_baseline(outputs)
    scenes = [
        (meta["scene"], im)
        for meta, im in zip(outputs.metadata, outputs.images)
        if isinstance(meta.get("scene"), list)
    ]
    if not scenes:
        return metrics
    unseen = heldout_triples()
    found = [recognize_scene(im) for _, im in scenes]
    metrics["gen/scene_accuracy"] = float(
        np.mean([scene_set(sc) == f for (sc, _), f in zip(scenes, found)])
    )
    # (object is a held-out triple, object recognised at its position)
    hits = [
        (Obj(**o) in unseen, scene_set([o]) <= f) for (sc, _), f in zip(scenes, found) for o in sc
    ]
    metrics["gen/object_accuracy"] = float(np.mean([h for _, h in hits]))
    if any(u for u, _ in hits):
        metrics["gen/unseen_object_accuracy"] = float(np.mean([h for u, h in hits if u]))
    return metrics
